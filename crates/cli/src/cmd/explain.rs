//! `saekit explain`: explain and score features with an LLM behind an OpenAI-compatible API (the loop
//! lives in `saekit_explain`); without `--endpoint`, a `saekit serve` on the same database and SAE is
//! started in this process and explains with the local model.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use saekit_analysis::FeatureDb;
use saekit_explain::examples::ExampleOptions;
use saekit_explain::run::parse_feature_list;
use saekit_explain::{
    explain_features, score_shuffled_control, ChatClient, ClientOptions, ControlSummary, ExplainOptions, Scoring,
};

use super::model_arg::ModelArgs;

const EXAMPLES: &str = "\
What it does, per feature (delphi's autointerp loop):
  explain    the top-activating contexts and one per activation quantile, activating tokens
             marked <<like this>> with activations 0-10, go to the explainer; its one-line
             description is kept
  detection  activating contexts the explainer never saw, mixed with as many held-out contexts
             where the feature is 0 (kept by `saekit analyze`): which match the description?
  fuzzing    the same activating contexts, once with the real marks and once with the marks
             moved to tokens where the feature is 0: which are marked correctly?
--scorer-batch 1 asks the scorers one yes/no question per example instead of a list (for a
small model; the reply's first word is read, or with --scorer-logprobs the first token's
log-probabilities of yes against no). Each scorer is stored as balanced accuracy (0.5
is chance) with its counts; replies that cannot be read count as unparsed, and a scorer that read none is shown as unmeasured, not as 0. Results
go into --db beside the feature, one explanation per explainer model; `saekit feature` and
`saekit serve` show the best-scoring one. A rerun skips features this model already explained,
so an interrupted run resumes. 401/403/404 stop the run at once; 429, 5xx and timeouts are
retried with backoff.

Examples:
  # the local model (SmolLM2-135M through an in-process `saekit serve`), 20 random features
  saekit explain --db run/features.sqlite --sae run/sae --sample 20

  # any OpenAI-compatible server (OpenAI, vLLM, llama.cpp); the key from $OPENAI_API_KEY
  saekit explain --db run/features.sqlite --endpoint https://api.openai.com/v1 \\
      --model gpt-4o-mini --features 0-999 --concurrency 8

  # a local vLLM with its key in $MY_KEY, slower requests allowed, a few chosen features
  saekit explain --db run/features.sqlite --endpoint http://127.0.0.1:8000/v1 \\
      --model Qwen/Qwen2.5-7B-Instruct --api-key-env MY_KEY --timeout 300 --features 5,7,10-12

  # the floor: rescore those features with each other's explanations (nothing is stored)
  saekit explain --db run/features.sqlite --sae run/sae --sample 20 --shuffled-control
  saekit explain --db run/features.sqlite --sae run/sae --sample 20 --shuffled-control --scorer-batch 1
  saekit explain --db run/features.sqlite --sae run/sae --sample 20 --scorer-batch 1 --scorer-logprobs

  # then read them
  saekit feature --db run/features.sqlite 42";

#[derive(clap::Args, Debug)]
#[command(after_help = EXAMPLES)]
pub struct ExplainArgs {
    /// Feature database from `saekit analyze` (explanations are stored in it).
    #[arg(long, default_value = "features.sqlite")]
    pub db: PathBuf,
    /// OpenAI-compatible API base, e.g. http://127.0.0.1:8000/v1 (vLLM, llama.cpp, `saekit serve`).
    /// Default: start `saekit serve` on --db and --sae in this process and use its model.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// The explainer model's name at the endpoint (default with a local serve: its model).
    #[arg(long)]
    pub model: Option<String>,
    /// Features to explain: `0-999`, `5,7,10-12` (default: all).
    #[arg(long, conflicts_with = "sample")]
    pub features: Option<String>,
    /// Explain N features drawn at random (seeded by --seed).
    #[arg(long)]
    pub sample: Option<usize>,
    /// Requests in flight at once (one feature per worker).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Environment variable holding the API key (sent as a Bearer token when set).
    #[arg(long, default_value = "OPENAI_API_KEY")]
    pub api_key_env: String,
    /// Seconds one request may take.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Retries of a request that failed with 429, 5xx or a network error (exponential backoff from 1 s).
    #[arg(long, default_value_t = 5)]
    pub retries: u32,
    /// Top-activating contexts shown to the explainer (one from each activation quantile is added).
    #[arg(long, default_value_t = 8)]
    pub n_explain: usize,
    /// Activating test contexts per scorer (and as many held-out ones for detection).
    #[arg(long, default_value_t = 10)]
    pub n_test: usize,
    /// Examples per scorer request (delphi's num_examples_per_scorer_prompt, default 5: the scorer
    /// answers with a list). 1 asks one yes/no question per example and reads the reply's first word
    /// (yes/no/true/false/1/0): for a small scorer that cannot write a list of the right length.
    #[arg(long, visible_alias = "batch", default_value_t = 5)]
    pub scorer_batch: usize,
    /// With --scorer-batch 1: read each answer from the first token's log-probabilities (the
    /// probability of yes/true/1 against no/false/0 among the 20 likeliest) instead of from the text,
    /// as delphi's log_prob scoring does. A small scorer that does not begin its reply with the answer
    /// still ranks the two. Needs an endpoint that returns logprobs (OpenAI, vLLM, saekit serve).
    #[arg(long)]
    pub scorer_logprobs: bool,
    /// Seed of --sample, of which held-out windows detection uses, of the order of the scorers' examples
    /// and of the fuzzing marks.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The SAE folder the database describes (for the local serve, without --endpoint).
    #[arg(long)]
    pub sae: Option<PathBuf>,
    /// The language model of the local serve (default: SmolLM2-135M-Instruct from the cache).
    #[arg(long, env = "SAEKIT_MODEL")]
    pub lm: Option<String>,
    /// Store nothing; instead score the features this model has already explained twice, each with its
    /// own explanation and with another feature's (a seeded derangement), on the same examples: the
    /// floor a real explanation must beat. Prints both score spreads (all rows with --json).
    #[arg(long)]
    pub shuffled_control: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: ExplainArgs) -> Result<()> {
    let db = FeatureDb::open(&a.db)?;
    let n = db.info()?.d_sae;
    let features = match (&a.features, a.sample) {
        (Some(spec), _) => parse_feature_list(spec, n)?,
        (None, Some(k)) => {
            let mut all: Vec<u32> = (0..n).collect();
            all.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(a.seed));
            all.truncate(k);
            all.sort_unstable();
            all
        }
        (None, None) => (0..n).collect(),
    };
    drop(db);
    let (endpoint, model) = match &a.endpoint {
        Some(e) => (e.clone(), a.model.clone().context("--endpoint needs --model (the explainer's name there)")?),
        None => local_endpoint(&a)?,
    };
    let client = ChatClient::new(ClientOptions {
        endpoint,
        model,
        api_key: std::env::var(&a.api_key_env).ok().filter(|k| !k.is_empty()),
        timeout: Duration::from_secs(a.timeout.max(1)),
        retries: a.retries,
        backoff: Duration::from_secs(1),
    })?;
    if a.scorer_logprobs && a.scorer_batch != 1 {
        bail!("--scorer-logprobs reads one yes/no answer per request: give --scorer-batch 1");
    }
    let opts = ExplainOptions {
        features,
        concurrency: a.concurrency.max(1),
        examples: ExampleOptions { n_top: a.n_explain, n_test: a.n_test, seed: a.seed },
        scoring: Scoring { batch: a.scorer_batch.max(1), logprobs: a.scorer_logprobs },
        progress: !a.json,
    };
    if a.shuffled_control {
        return print_control(&score_shuffled_control(&a.db, &client, &opts)?, a.json);
    }
    let s = explain_features(&a.db, &client, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let mins = s.seconds / 60.0;
    println!(
        "explained {} features with {} in {:.1} min ({:.1} features/min); {} already done, {} never fired, {} failed",
        s.explained,
        client.model(),
        mins,
        s.explained as f64 / mins.max(1e-9),
        s.already_done,
        s.dead,
        s.failed.len()
    );
    println!("tokens: {} prompt + {} completion", s.prompt_tokens, s.completion_tokens);
    if s.no_negatives > 0 {
        println!("{} features had no held-out text where they are 0: detection not scored", s.no_negatives);
    }
    for (id, why) in s.failed.iter().take(10) {
        println!("  feature {id}: {why}");
    }
    Ok(())
}

fn print_control(s: &ControlSummary, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(s)?);
        return Ok(());
    }
    println!(
        "shuffled control with {}: {} features scored in {:.1} min ({} not explained by it, {} failed); balanced accuracy:",
        s.model,
        s.features.len(),
        s.seconds / 60.0,
        s.unexplained,
        s.failed.len()
    );
    for (name, c) in [("detection", &s.detection), ("fuzzing", &s.fuzzing)] {
        for (which, sp) in [("real", &c.real), ("shuffled", &c.shuffled)] {
            println!(
                "  {name:<9} {which:<8} n {:>4}  mean {:.3}  quartiles {:.3} / {:.3} / {:.3}",
                sp.n, sp.mean, sp.q25, sp.median, sp.q75
            );
        }
        for (which, n) in [("real", &c.real_answers), ("shuffled", &c.shuffled_answers)] {
            println!(
                "  {name:<9} {which:<8} examples answered {} (said yes to {}), unanswered {}",
                n.answered, n.yes, n.unanswered
            );
        }
        println!("  {name:<9} real beats shuffled on {:.0}% of features (ties half)", 100.0 * c.real_wins);
        if let Some(a) = &c.auroc {
            for (which, sp) in [("real", &a.real), ("shuffled", &a.shuffled)] {
                println!(
                    "  {name:<9} {which:<8} AUROC of P(yes): n {:>4}  mean {:.3}  quartiles {:.3} / {:.3} / {:.3}",
                    sp.n, sp.mean, sp.q25, sp.median, sp.q75
                );
            }
            println!("  {name:<9} real beats shuffled on AUROC on {:.0}% of features (ties half)", 100.0 * a.real_wins);
        }
    }
    println!("tokens: {} prompt + {} completion", s.prompt_tokens, s.completion_tokens);
    Ok(())
}

/// Start `saekit serve` on the database and SAE on a free loopback port; its model explains.
fn local_endpoint(a: &ExplainArgs) -> Result<(String, String)> {
    let Some(sae) = &a.sae else {
        bail!("give --endpoint URL --model NAME, or --sae DIR to explain with the local model through `saekit serve`")
    };
    let limits = saekit_serve::Limits { max_new_tokens: 256, max_body_bytes: 256 * 1024, ..Default::default() };
    let model = ModelArgs { model: a.lm.clone(), tokenizer: None };
    let state = super::serve::app_state(
        &a.db,
        super::serve::EngineArgs { sae: Some(sae.as_path()), ..Default::default() },
        &model,
        a.concurrency.max(1) * 2,
        limits,
    )?;
    let name = state.model_info["name"].as_str().unwrap_or_default().to_string();
    let addr = saekit_serve::spawn_background(state, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    eprintln!("explaining with the local model {name} through saekit serve at http://{addr}/v1");
    let chosen = a.model.clone().unwrap_or(name);
    Ok((format!("http://{addr}/v1"), chosen))
}
