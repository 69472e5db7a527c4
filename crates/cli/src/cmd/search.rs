//! `saekit search`: find features by concept (a text, or two contrasting sets of texts).

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use clap::Args;
use saekit_analysis::analyze::sae_hook;
use saekit_analysis::search::{contrast, read_texts, search_text, text_features, token_share_difference};
use saekit_analysis::FeatureDb;
use saekit_sae::load_sae;

use super::concept_steering::{max_activation, steering_order};
use super::model_arg::ModelArgs;

/// `--text "..."`: the features that fire on a text, per token and overall (with their strongest
/// context from `--db`). `--pos FILE --neg FILE` (one text per line, or JSONL with a `text` field):
/// features ranked by AUROC of their per-text max activation between the two sets (ties broken by the
/// effect size: the mean gap relative to the feature's scale), with firing frequency in each set and a
/// two-proportion z-score; with `--steer N` also the N best measured for steering toward the positive set.
#[derive(Args, Debug)]
pub struct SearchArgs {
    /// SAE folder or params.npz.
    pub sae: String,
    #[arg(long, conflicts_with_all = ["pos", "neg"])]
    pub text: Option<String>,
    #[arg(long, requires = "neg")]
    pub pos: Option<PathBuf>,
    #[arg(long, requires = "pos")]
    pub neg: Option<PathBuf>,
    /// Feature database for context (top tokens, strongest context, max activation).
    #[arg(long)]
    pub db: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub hook: Option<String>,
    /// Features listed overall (and from each end for --pos/--neg).
    #[arg(long, default_value_t = 15)]
    pub top: usize,
    /// Features listed per token.
    #[arg(long, default_value_t = 3)]
    pub per_token: usize,
    /// Tokens per text for --pos/--neg.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// With --pos/--neg and --db: also measure the N best features by AUROC for steering toward the
    /// positive texts, and list them by that measure. Each is clamped at 3x its max activation while the
    /// model reads four chat prompts and its own answers. The measure is the mean gain in log-probability
    /// of the positive texts' tokens over the negative texts'. `saekit demo` chooses its steering feature
    /// this way. A feature that separates the texts often does not steer toward them.
    #[arg(long, requires_all = ["pos", "db"], value_name = "N")]
    pub steer: Option<usize>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: SearchArgs) -> Result<()> {
    let sae = load_sae(&a.sae)?;
    let model = a.model.load()?;
    let hook = sae_hook(&model, &sae, &a.sae, a.hook.as_deref().map(str::parse).transpose()?)?;
    let db = a.db.as_deref().map(FeatureDb::open).transpose()?;
    if let Some(db) = &db {
        db.check_made_for(&sae).with_context(|| format!("SAE {}", a.sae))?;
    }
    let describe = |id: u32| -> String {
        let Some(db) = &db else { return String::new() };
        match db.feature(id) {
            Ok(Some(f)) => {
                let ctx = f
                    .top_contexts
                    .first()
                    .map(|c| saekit_analysis::render::peak_snippet(&c.tokens, c.peak, 6, 2))
                    .unwrap_or_default();
                format!("  \"{}\"  e.g. {ctx}", f.explanation.unwrap_or_default())
            }
            _ => String::new(),
        }
    };
    if let Some(text) = &a.text {
        let max_of = |id: u32| db.as_ref().and_then(|d| d.summary(id).ok().flatten()).map(|s| s.max_act);
        let r = search_text(&model, &sae, hook, text, a.per_token, a.top, Some(&max_of))?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
            return Ok(());
        }
        println!("per token (feature:activation)");
        for t in &r.tokens {
            let f: Vec<String> = t.features.iter().map(|(j, v)| format!("#{j}:{v:.2}")).collect();
            println!("  {:<16} {}", format!("{:?}", t.token), f.join("  "));
        }
        println!("\noverall (by summed activation)");
        for h in &r.overall {
            let frac = h.frac_of_db_max.map(|f| format!(" ({:.0}% of db max)", 100.0 * f)).unwrap_or_default();
            println!(
                "  #{:<7} max {:>7.3}{frac}  sum {:>8.3}  on {} tokens{}",
                h.id,
                h.max_act,
                h.sum_act,
                h.n_tokens,
                describe(h.id)
            );
        }
        return Ok(());
    }
    let (Some(pos), Some(neg)) = (&a.pos, &a.neg) else { bail!("give --text, or --pos FILE and --neg FILE") };
    let (pt, nt) = (read_texts(pos)?, read_texts(neg)?);
    let pf = text_features(&model, &sae, hook, &pt, a.max_tokens)?;
    let nf = text_features(&model, &sae, hook, &nt, a.max_tokens)?;
    let hits = contrast(&pf, &nf);
    let steering = match (a.steer, &db) {
        (Some(n), Some(db)) => {
            let weights = token_share_difference(&model, &pt, &nt, a.max_tokens)?;
            let choice = saekit_steer::SteeringChoice { model: &model, sae: &sae, hook, times: 3.0, candidates: n };
            let probes = saekit_steer::answered_chats(&model, &saekit_steer::PROBE_PROMPTS, 32)?;
            Some(steering_order(&choice, &hits, &weights, &probes, &max_activation(db))?)
        }
        _ => None,
    };
    if a.json {
        match &steering {
            Some(s) => {
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({"contrast": hits, "steering": s}))?)
            }
            None => println!("{}", serde_json::to_string_pretty(&hits)?),
        }
        return Ok(());
    }
    println!(
        "{} positive texts, {} negative texts; ranked by AUROC of per-text max activation (0.5 = no separation), \
         ties by effect = (mean pos - mean neg) / the feature's largest activation on these texts",
        pt.len(),
        nt.len()
    );
    let line = |h: &saekit_analysis::search::ContrastHit| {
        println!(
            "  #{:<7} auroc {:.3}  effect {:>+6.3}  fires on {:>5.1}% pos / {:>5.1}% neg  z {:>6.2}  mean {:.3} / {:.3}{}",
            h.id,
            h.auroc,
            h.effect,
            100.0 * h.freq_pos,
            100.0 * h.freq_neg,
            h.z,
            h.mean_pos,
            h.mean_neg,
            describe(h.id)
        )
    };
    println!("\nfeatures of the positive set");
    hits.iter().take(a.top).for_each(line);
    println!("\nfeatures of the negative set");
    hits.iter().rev().take(a.top).for_each(line);
    if let Some(picks) = steering {
        println!(
            "\nfor steering toward the positive set: the {} best by AUROC, by the log-probability they add to its \
             tokens (over the negative set's) when clamped at 3x max on four chat prompts",
            picks.len()
        );
        for p in picks.iter().take(a.top) {
            println!(
                "  #{:<7} lift {:>+7.4}  auroc {:.3}{}",
                p.hit.id,
                p.lift.unwrap_or(0.0),
                p.hit.auroc,
                describe(p.hit.id)
            );
        }
    }
    Ok(())
}
