//! `saekit generate`: text generation with the KV cache, the chat template and seeded sampling, optionally
//! steered by SAE features (clamp, add, ablate) and printed beside the unsteered text.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use saekit_model::{ChatMessage, GenerateOptions, HookPoint, Hooks, Sampling};
use saekit_steer::{EditSpec, FeatureEdit, Positions};

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
    /// An SAE folder (SAELens layout, or sparsify / Gemma Scope) whose features --steer/--add/--ablate name.
    #[arg(long)]
    pub sae: Option<PathBuf>,
    /// Hook point the SAE reads (default: the SAE's cfg.json hook_name).
    #[arg(long)]
    pub hook: Option<String>,
    /// Clamp a feature at every position, keeping the SAE error term (Anthropic's method):
    /// FEATURE=VALUE, or FEATURE=Nx for N times its max activation (needs --db). Repeatable.
    #[arg(long = "steer", value_name = "FEATURE=VALUE")]
    pub steer: Vec<EditSpec>,
    /// Add COEFF x the feature's decoder direction at every position (SAELens / Neuronpedia). Repeatable.
    #[arg(long = "add", value_name = "FEATURE=COEFF")]
    pub add: Vec<EditSpec>,
    /// Clamp a feature to 0. Repeatable.
    #[arg(long = "ablate", value_name = "FEATURE")]
    pub ablate: Vec<u32>,
    /// Feature database from `saekit analyze` (for Nx multiples of a feature's max activation).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Also edit position 0 (an attention sink in SmolLM2, outside what the SAE was trained on).
    #[arg(long)]
    pub steer_first: bool,
    /// Print the unsteered continuation (same seed) beside the steered one.
    #[arg(long)]
    pub compare: bool,
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
        tok.encode_chat(&msgs)
    } else {
        tok.encode(prompt, true)
    }
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let opts = args.options()?;
    let model = args.model.load()?;
    let ids = prompt_ids(&model, &args.prompt, args.chat, args.system.as_deref())?;
    let Some(sae_path) = &args.sae else {
        if !(args.steer.is_empty() && args.add.is_empty() && args.ablate.is_empty()) || args.compare {
            bail!("--steer, --add, --ablate and --compare need --sae");
        }
        let g = model.generate(&ids, &opts, &mut Hooks::new())?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&g)?);
        } else {
            println!("{}", show(&g.text));
        }
        return Ok(());
    };
    let sae = saekit_sae::load_sae(sae_path)?;
    let asked: Option<HookPoint> = args.hook.as_deref().map(str::parse).transpose()?;
    let hook = saekit_analysis::analyze::sae_hook(&model, &sae, &sae_path.display().to_string(), asked)?;
    let edits = resolve_edits(&args)?;
    let positions = if args.steer_first { Positions::All } else { Positions::SkipFirst };
    let c = if args.compare {
        saekit_steer::compare(&model, &sae, hook, &edits, positions, &ids, &opts)?
    } else {
        let steered = saekit_steer::generate_steered(&model, &sae, hook, &edits, positions, &ids, &opts)?;
        saekit_steer::Comparison { baseline: steered.clone(), steered, edits: edits.clone() }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&c)?);
    } else if args.compare {
        println!(
            "--- unsteered\n{}\n--- steered ({})\n{}",
            show(&c.baseline.text),
            describe(&edits),
            show(&c.steered.text)
        );
    } else {
        println!("{}", show(&c.steered.text));
    }
    Ok(())
}

fn show(text: &str) -> &str {
    text.trim_end_matches("<|im_end|>")
}

fn describe(edits: &[FeatureEdit]) -> String {
    edits
        .iter()
        .map(|e| match e {
            FeatureEdit::Clamp { feature, value } => format!("clamp {feature}={value}"),
            FeatureEdit::Add { feature, coeff } => format!("add {feature}+={coeff}"),
            FeatureEdit::Scale { feature, factor } => format!("scale {feature}*={factor}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Turn the flags into edits, resolving `Nx` against the feature database's max activations.
fn resolve_edits(args: &GenerateArgs) -> Result<Vec<FeatureEdit>> {
    let db = match &args.db {
        Some(p) => Some(saekit_analysis::FeatureDb::open(p)?),
        None => None,
    };
    let max_act = |f: u32| -> Result<f32> {
        let db = db.as_ref().context("a multiple like 10x needs the feature database: pass --db features.sqlite")?;
        let rec = db.feature(f)?.with_context(|| format!("feature {f} is not in the database"))?;
        if rec.max_act <= 0.0 {
            bail!("feature {f} never fired in the analysed tokens, so Nx of its max activation is 0; give a value");
        }
        Ok(rec.max_act)
    };
    let mut edits = Vec::new();
    for s in &args.steer {
        edits.push(FeatureEdit::Clamp { feature: s.feature, value: saekit_steer::parse_edit(s, max_act)? });
    }
    for s in &args.add {
        edits.push(FeatureEdit::Add { feature: s.feature, coeff: saekit_steer::parse_edit(s, max_act)? });
    }
    for &f in &args.ablate {
        edits.push(FeatureEdit::Clamp { feature: f, value: 0.0 });
    }
    Ok(edits)
}
