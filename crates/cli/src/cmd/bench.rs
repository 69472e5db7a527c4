//! `saekit bench`: throughput measurements reported in BENCHMARKS.md. Each prints one JSON line per
//! configuration so a script can put it beside the Python baseline measured in the same command.

use saekit_kernels::{gemm_bf16, Bf16Path, PackedB};
use std::time::Instant;

use anyhow::Result;
use rand::{Rng, SeedableRng};
use saekit_model::{HookPoint, Hooks, Logits};

use super::model_arg::ModelArgs;

#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Forward pass to a layer's resid_post on random token ids (what harvesting costs).
    Forward(ForwardArgs),
    /// GEMM rate for the shapes the forward pass and SAE training use, on every path this CPU has:
    /// f32 (the `gemm` crate) and bf16 with f32 accumulation (AMX tiles, AVX512-BF16), the weight
    /// packed once as in training and harvest, the input rounded per call; JSON lines.
    Gemm(GemmArgs),
    /// Greedy generation with and without a steering hook (one clamped SAE feature).
    Steer(SteerArgs),
    /// Whether the feature concept search ranks first steers toward its concept more often than the
    /// tenth: each concept's ranked features clamped while the model answers neutral prompts, every answer
    /// judged by a character n-gram detector trained on the corpus; JSON lines.
    ConceptSteering(super::concept_steering::ConceptSteeringArgs),
}

#[derive(clap::Args, Debug)]
pub struct SteerArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// SAE folder whose feature is clamped.
    #[arg(long)]
    pub sae: std::path::PathBuf,
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
}

#[derive(clap::Args, Debug)]
pub struct ForwardArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Stop after this block (its resid_post); -1 = the whole model with logits for every position.
    #[arg(long, default_value_t = 15, allow_negative_numbers = true)]
    pub layer: i64,
    /// Comma-separated batch sizes.
    #[arg(long, default_value = "1,4,16")]
    pub batches: String,
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Minimum seconds timed per configuration.
    #[arg(long, default_value_t = 8.0)]
    pub min_time: f64,
    #[command(flatten)]
    pub precision: super::model_arg::PrecisionArgs,
}

#[derive(clap::Args, Debug)]
pub struct GemmArgs {
    /// Shapes as MxKxN, comma-separated.
    #[arg(long, default_value = "4096x576x16384,4096x16384x576,512x576x1536,512x576x960")]
    pub shapes: String,
    #[arg(long, default_value_t = 3.0)]
    pub min_time: f64,
    /// Also time the portable scalar bf16 path (slow: for checking it runs, not for speed).
    #[arg(long)]
    pub reference: bool,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Forward(a) => forward(a),
        BenchCommand::Gemm(a) => gemm_rate(a),
        BenchCommand::Steer(a) => steer(a),
        BenchCommand::ConceptSteering(a) => super::concept_steering::run(a),
    }
}

fn steer(a: SteerArgs) -> Result<()> {
    use saekit_steer::{add_steering_hook, FeatureEdit, Positions};
    let model = a.model.load()?;
    let sae = saekit_sae::load_sae(&a.sae)?;
    let hook: HookPoint = sae.metadata.hook_name.parse()?;
    let ids = super::generate::prompt_ids(&model, "Tell me about your weekend.", true, None)?;
    // The same number of tokens both ways: no stop at the end-of-turn token.
    let opts = saekit_model::GenerateOptions { max_new_tokens: a.tokens, stop_at_eos: false, ..Default::default() };
    let edits = [FeatureEdit::Clamp { feature: 0, value: 0.0 }];
    let (mut plain, mut steered) = (Vec::new(), Vec::new());
    for _ in 0..a.runs.max(1) {
        let t = Instant::now();
        model.generate(&ids, &opts, &mut Hooks::new())?;
        plain.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut hooks = Hooks::new();
        add_steering_hook(&mut hooks, &sae, hook, &edits, Positions::SkipFirst);
        model.generate(&ids, &opts, &mut hooks)?;
        steered.push(t.elapsed().as_secs_f64());
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|x, y| x.total_cmp(y));
        v[v.len() / 2]
    };
    let (p, s) = (med(&mut plain), med(&mut steered));
    println!(
        "{}",
        serde_json::json!({"impl": "saekit", "prompt_tokens": ids.len(), "new_tokens": a.tokens, "d_sae": sae.d_sae,
            "plain_s": p, "steered_s": s, "plain_tok_per_s": a.tokens as f64 / p, "steered_tok_per_s": a.tokens as f64 / s,
            "cost_ratio": s / p})
    );
    Ok(())
}

/// Median seconds of `f` over at least `min_time` seconds and 3 runs, after one warm-up.
fn time_median(min_time: f64, mut f: impl FnMut() -> Result<()>) -> Result<(f64, usize)> {
    f()?;
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 3 || start.elapsed().as_secs_f64() < min_time {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok((times[times.len() / 2], times.len()))
}

fn forward(a: ForwardArgs) -> Result<()> {
    // to a layer, only the blocks up to it are loaded, as harvest does
    let precision = super::model_arg::PrecisionArgs::resolve(a.precision.precision)?;
    let model = a.model.load_at((a.layer >= 0).then_some(a.layer as usize + 1), precision)?;
    let cfg = model.config().clone();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    for b in a.batches.split(',') {
        let batch: usize = b.trim().parse().map_err(|_| anyhow::anyhow!("bad batch size '{b}'"))?;
        let ids: Vec<u32> =
            (0..batch * a.seq).map(|_| rng.gen_range(100..49_000u32.min(cfg.vocab_size as u32))).collect();
        let (blocks, logits) =
            if a.layer < 0 { (cfg.n_layers, Logits::All) } else { (a.layer as usize + 1, Logits::None) };
        let (sec, iters) = time_median(a.min_time, || {
            let mut hooks = Hooks::new();
            if logits == Logits::None {
                hooks.add(HookPoint::ResidPost(blocks - 1), |_, _| Ok(()));
            }
            let mut cache = model.new_cache(batch);
            model.forward(&ids, batch, &mut cache, &mut hooks, logits)?;
            Ok(())
        })?;
        let tokens = (batch * a.seq) as f64;
        let per_block = 2.0 * cfg.d_model as f64 * (cfg.q_dim() + 2 * cfg.kv_dim() + cfg.q_dim()) as f64
            + 2.0 * 3.0 * cfg.d_model as f64 * cfg.d_ff as f64;
        let mut flops = tokens * per_block * blocks as f64;
        if logits == Logits::All {
            flops += tokens * 2.0 * (cfg.d_model * cfg.vocab_size) as f64;
        }
        println!(
            "{}",
            serde_json::json!({
                "impl": "saekit", "mode": if a.layer < 0 { "full".to_string() } else { format!("L{}", a.layer) },
                "batch": batch, "seq": a.seq, "threads": rayon::current_num_threads(),
                "precision": precision.name(), "sec_per_batch_median": sec, "iters": iters, "tokens_per_s": tokens / sec,
                "linear_gflops": flops / sec / 1e9,
            })
        );
    }
    Ok(())
}

fn gemm_rate(a: GemmArgs) -> Result<()> {
    for s in a.shapes.split(',') {
        let dims: Vec<usize> = s
            .split('x')
            .map(|v| v.trim().parse())
            .collect::<Result<_, _>>()
            .map_err(|_| anyhow::anyhow!("bad shape '{s}', expected MxKxN"))?;
        let [m, k, n] = dims[..] else { anyhow::bail!("bad shape '{s}', expected MxKxN") };
        let x: Vec<f32> = (0..m * k).map(|i| ((i % 97) as f32 - 48.0) / 97.0).collect();
        let w: Vec<f32> = (0..k * n).map(|i| ((i % 89) as f32 - 44.0) / 89.0).collect();
        let mut y = vec![0f32; m * n];
        let (sec, _) = time_median(a.min_time, || {
            saekit_model::linalg::matmul(&x, m, k, &w, n, &mut y, false);
            Ok(())
        })?;
        print_gemm_rate("f32-gemm", (m, k, n), sec);
        let packed = PackedB::from_kn(&w, k, n);
        for path in Bf16Path::available_paths() {
            if path == Bf16Path::Reference && !a.reference {
                continue;
            }
            let (sec, _) = time_median(a.min_time, || {
                gemm_bf16(path, &x, m, k, &packed, &mut y, n, false);
                Ok(())
            })?;
            print_gemm_rate(path.name(), (m, k, n), sec);
        }
    }
    Ok(())
}

fn print_gemm_rate(path: &str, (m, k, n): (usize, usize, usize), sec: f64) {
    println!(
        "{}",
        serde_json::json!({"impl": "saekit", "path": path, "m": m, "k": k, "n": n, "threads": rayon::current_num_threads(),
            "ms": sec * 1e3, "gflops": 2.0 * (m * k * n) as f64 / sec / 1e9})
    );
}
