//! `saekit feature ID`: a text dashboard of one feature from a feature database.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use saekit_analysis::{Context as Ctx, FeatureDb, FeatureRecord, SortBy};

/// Print a feature's dashboard: stats, explanation, top contexts (peak token in [brackets], other
/// firing tokens marked with their activation), quantile samples, histogram, logit effects and
/// neighbours. `--list density|max_act|id` lists features instead.
#[derive(Args, Debug)]
pub struct FeatureArgs {
    /// Feature id (omit with --list).
    pub id: Option<u32>,
    /// Feature database from `saekit analyze`.
    #[arg(long, default_value = "features.sqlite")]
    pub db: PathBuf,
    /// Print the full record as JSON.
    #[arg(long)]
    pub json: bool,
    /// Top contexts to show.
    #[arg(long, default_value_t = 10)]
    pub contexts: usize,
    /// List features sorted by this key (density, max_act, id), highest first.
    #[arg(long)]
    pub list: Option<String>,
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    #[arg(long, default_value_t = 0)]
    pub offset: usize,
}

pub fn run(a: FeatureArgs) -> Result<()> {
    let db = FeatureDb::open(&a.db)?;
    if let Some(key) = &a.list {
        let sort: SortBy = key.parse()?;
        let rows = db.list(sort, sort != SortBy::Id, a.offset, a.limit)?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            for r in rows {
                println!(
                    "#{:<8} density {:>9.3e}  max {:>8.3}  {}",
                    r.id,
                    r.density,
                    r.max_act,
                    quote_all(&r.top_tokens)
                );
            }
        }
        return Ok(());
    }
    let Some(id) = a.id else { bail!("give a feature id, or --list density|max_act|id") };
    let info = db.info()?;
    let Some(f) = db.feature(id)? else {
        bail!("{}: no feature {id} (the SAE has {} features)", a.db.display(), info.d_sae)
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&f)?);
        return Ok(());
    }
    print!("{}", dashboard(&f, &info, a.contexts));
    Ok(())
}

fn quote_all(t: &[String]) -> String {
    t.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(" ")
}

/// The context as text (characters split across tokens joined, carrying their highest activation): the
/// peak in [brackets], other firing pieces with their activation.
fn show(c: &Ctx) -> String {
    let mut s = String::new();
    for p in saekit_analysis::render::merge_tokens(&c.tokens, &c.acts) {
        let t = p.text.replace('\n', "\\n");
        if (p.first..p.first + p.len).contains(&c.peak) {
            s.push_str(&format!("[{t}]"));
        } else if p.act > 0.0 && p.act >= 0.2 * c.max_act {
            s.push_str(&format!("{t}\u{00b7}{:.1}\u{00b7}", p.act));
        } else {
            s.push_str(&t);
        }
    }
    s
}

/// `detection 0.85 balanced accuracy (tp 9 fn 1 tn 8 fp 2)`, or that it was not scored.
fn score_line(name: &str, s: Option<saekit_analysis::Score>) -> String {
    match s {
        None => format!("{name}: not scored"),
        Some(s) if s.answered() == 0 => format!("{name}: no answer could be read ({} unparsed)", s.unparsed),
        Some(s) => format!(
            "{name} {:.2} balanced accuracy{} (tp {} fn {} tn {} fp {}{})",
            s.balanced_accuracy,
            s.auroc.map(|a| format!(", AUROC {a:.2}")).unwrap_or_default(),
            s.tp,
            s.fn_,
            s.tn,
            s.fp,
            if s.unparsed > 0 { format!(", {} unparsed", s.unparsed) } else { String::new() }
        ),
    }
}

fn dashboard(f: &FeatureRecord, info: &saekit_analysis::DbInfo, n_ctx: usize) -> String {
    let mut s = String::new();
    s.push_str(&format!("feature {}  ({} {}, {} features)\n", f.id, info.model, info.hook, info.d_sae));
    s.push_str(&format!(
        "density {:.3e} ({} of {} tokens)   max act {:.3}   mean act {:.3}   map ({:.3}, {:.3})\n",
        f.density, f.n_fired, info.n_tokens, f.max_act, f.mean_act, f.x, f.y
    ));
    if let Some(e) = &f.explanation {
        s.push_str(&format!("explanation{}: {e}\n", if f.explanation_auto { " (automatic)" } else { "" }));
    }
    for (i, e) in f.explanations.iter().enumerate() {
        s.push_str(&format!(
            "{} {:?}  ({})\n",
            if i == 0 { "LLM explanation:" } else { "             or:" },
            e.text,
            e.model
        ));
        s.push_str(&format!("    {}   {}\n", score_line("detection", e.detection), score_line("fuzzing", e.fuzzing)));
    }
    s.push_str("\ntop activations  (peak in [brackets], other tokens \u{00b7}act\u{00b7} when >= 20% of the peak)\n");
    for c in f.top_contexts.iter().take(n_ctx) {
        s.push_str(&format!("  {:>8.3}  {}\n", c.max_act, show(c)));
    }
    if f.top_contexts.is_empty() {
        s.push_str("  (never fired on the analysed tokens)\n");
    }
    if f.quantiles.iter().any(|q| !q.contexts.is_empty()) {
        s.push_str("\nquantile intervals (contexts sampled across the activation range)\n");
        for q in f.quantiles.iter().rev() {
            if q.contexts.is_empty() {
                continue;
            }
            s.push_str(&format!("  [{:.3}, {:.3})  {} contexts\n", q.lo, q.hi, q.count));
            for c in q.contexts.iter().take(2) {
                s.push_str(&format!("    {:>8.3}  {}\n", c.max_act, show(c)));
            }
        }
    }
    let h = &f.histogram;
    let maxc = h.counts.iter().copied().max().unwrap_or(0);
    if maxc > 0 {
        s.push_str("\nactivation histogram (log-spaced bins)\n");
        let first = h.counts.iter().position(|&c| c > 0).unwrap_or(0);
        let last = h.counts.iter().rposition(|&c| c > 0).unwrap_or(0);
        for i in first..=last {
            let bar = "#".repeat(((h.counts[i] as f64 / maxc as f64) * 40.0).ceil() as usize);
            s.push_str(&format!("  {:>9.3e} {:<40} {}\n", h.edges[i], bar, h.counts[i]));
        }
    }
    s.push_str("\npositive logits                     negative logits\n");
    for i in 0..f.promoted.len().max(f.suppressed.len()) {
        let p =
            f.promoted.get(i).map(|t| format!("{:<22} {:+.3}", format!("{:?}", t.token), t.logit)).unwrap_or_default();
        let n = f
            .suppressed
            .get(i)
            .map(|t| format!("{:<22} {:+.3}", format!("{:?}", t.token), t.logit))
            .unwrap_or_default();
        s.push_str(&format!("  {p:<34}{n}\n"));
    }
    s.push_str("\nnearest features (decoder cosine)\n  ");
    s.push_str(&f.neighbours.iter().map(|n| format!("#{} {:.3}", n.id, n.cosine)).collect::<Vec<_>>().join("   "));
    s.push('\n');
    s
}
