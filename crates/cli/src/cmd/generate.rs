//! `saekit generate`: text generation with the KV cache, the chat template and seeded sampling.

use anyhow::{bail, Result};
use saekit_model::{ChatMessage, GenerateOptions, Hooks, Sampling};

use super::model_arg::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt.
    #[arg(long, short = 'p')]
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// A system message (with --chat).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    #[arg(long, short = 'n', default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling mass (with --temperature > 0).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print JSON (prompt ids, generated ids, text).
    #[arg(long)]
    pub json: bool,
}

impl GenerateArgs {
    pub fn options(&self) -> Result<GenerateOptions> {
        if self.temperature < 0.0 {
            bail!("--temperature must be >= 0");
        }
        Ok(GenerateOptions {
            max_new_tokens: self.max_new_tokens,
            sampling: if self.temperature == 0.0 {
                Sampling::Greedy
            } else {
                Sampling::TopP { temperature: self.temperature, top_p: self.top_p }
            },
            seed: self.seed,
            stop_at_eos: true,
        })
    }
}

/// Render the prompt (chat template or plain) and tokenise it.
pub fn prompt_ids(model: &saekit_model::Model, prompt: &str, chat: bool, system: Option<&str>) -> Result<Vec<u32>> {
    let tok = model.tokenizer();
    if chat {
        let mut msgs = Vec::new();
        if let Some(s) = system {
            msgs.push(ChatMessage::system(s));
        }
        msgs.push(ChatMessage::user(prompt));
        tok.encode(&tok.apply_chat_template(&msgs)?, false)
    } else {
        tok.encode(prompt, true)
    }
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let opts = args.options()?;
    let model = args.model.load()?;
    let ids = prompt_ids(&model, &args.prompt, args.chat, args.system.as_deref())?;
    let g = model.generate(&ids, &opts, &mut Hooks::new())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&g)?);
    } else {
        println!("{}", g.text.trim_end_matches("<|im_end|>"));
    }
    Ok(())
}
