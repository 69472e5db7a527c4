//! `Model::set_precision`: the forward pass with bf16 linear layers (f32 accumulation) against the f32 pass,
//! on every architecture's fixture and on the real SmolLM2. On a CPU without AMX or AVX512-BF16 the
//! scalar reference path runs the same packing and rounding, slowly, so the token counts stay small.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use saekit_kernels::round_to_bf16;
use saekit_model::{Bf16Path, HookPoint, Hooks, LoadOptions, Logits, Model, Precision};

fn bf16_here() -> Precision {
    Precision::Bf16(Bf16Path::fastest().unwrap_or(Bf16Path::Reference))
}

fn fixture(arch: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(arch);
    assert!(dir.join("config.json").exists(), "{}: fixture missing", dir.display());
    dir
}

/// ‖a - b‖ / ‖b‖ over the rows of width `d` from `skip_rows` on.
fn rel_l2(a: &[f32], b: &[f32], d: usize, skip_rows: usize) -> f64 {
    assert_eq!(a.len(), b.len());
    let (a, b) = (&a[skip_rows * d..], &b[skip_rows * d..]);
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap_or(0)
}

/// One pass over `ids` (one sequence): the activation at `point` and the logits of every position.
fn run(m: &Model, ids: &[u32], point: HookPoint) -> (Vec<f32>, Vec<f32>) {
    let got = Mutex::new(Vec::new());
    let mut hooks = Hooks::new();
    hooks.add(point, |_, x| {
        *got.lock().unwrap() = x.to_vec();
        Ok(())
    });
    let logits = m.forward(ids, 1, &mut m.new_cache(1), &mut hooks, Logits::All).unwrap();
    drop(hooks);
    (got.into_inner().unwrap(), logits)
}

/// 64 tokens spread over the vocabulary (two of the kernels' 32-row blocks).
fn spread_tokens(vocab: usize) -> Vec<u32> {
    let n = 64u64;
    (0..n).map(|i| ((i * 7919 + 3) % vocab as u64) as u32).collect()
}

#[test]
fn every_architecture_runs_bf16_close_to_f32_and_returns_to_f32_bit_for_bit() {
    for arch in ["llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "pythia", "gpt2-tiny"] {
        let mut m = Model::load(&fixture(arch), &LoadOptions::default()).unwrap();
        let ids = spread_tokens(m.config().vocab_size);
        let last = HookPoint::ResidPost(m.config().n_layers - 1);
        let (acts32, logits32) = run(&m, &ids, last);
        m.set_precision(bf16_here());
        assert_eq!(m.precision(), bf16_here());
        let (acts16, logits16) = run(&m, &ids, last);
        let d = m.config().d_model;
        let (act_err, logit_err) = (rel_l2(&acts16, &acts32, d, 0), rel_l2(&logits16, &logits32, d, 0));
        println!("{arch}: bf16 vs f32, last resid_post {act_err:.2e}, logits {logit_err:.2e}");
        // the copies were used (a pass left on f32 would agree bit for bit), and they are bf16-close
        assert!(logit_err > 0.0 && act_err > 0.0, "{arch}: bf16 gave the f32 pass bit for bit");
        assert!(
            act_err < 2e-2 && logit_err < 2e-2,
            "{arch}: bf16 moved activations {act_err:.2e}, logits {logit_err:.2e}"
        );
        m.set_precision(Precision::F32);
        assert_eq!(run(&m, &ids, last), (acts32, logits32), "{arch}: back at f32 the pass differs");
    }
}

/// A bf16 pass with `no_op` hooks that only look at these points (so each runs unfused there), as it
/// leaves the last block's resid_post.
fn run_looking_at(m: &Model, ids: &[u32], no_op: &[HookPoint]) -> Vec<f32> {
    let got = Mutex::new(Vec::new());
    let mut hooks = Hooks::new();
    for &point in no_op {
        hooks.add(point, |_, _| Ok(()));
    }
    hooks.add(HookPoint::ResidPost(m.config().n_layers - 1), |_, x| {
        *got.lock().unwrap() = x.to_vec();
        Ok(())
    });
    m.forward(ids, 1, &mut m.new_cache(1), &mut hooks, Logits::None).unwrap();
    drop(hooks);
    got.into_inner().unwrap()
}

/// With no hook on the normalised rows, inside the MLP or on a block's output, a bf16 pass fuses: each
/// RMSNorm is rounded to bf16 as it is computed, gate/up, the activation and the rounding are one
/// kernel pass, and each block's output is added into the residual stream by the kernel. Hooks that
/// only look at `ln1/ln2.hook_normalized` or at `mlp.hook_post` make it run those parts one by one:
/// the same bits. Hooks at `attn_out` and `mlp_out` make it add the outputs once they are whole: f32
/// sums in another order, whose last-bit differences can flip a later bf16 rounding, so those agree to
/// well within bf16's 2^-9 rather than bit for bit.
#[test]
fn the_fused_bf16_passes_give_the_unfused_values() {
    for arch in ["llama", "qwen3", "phi3", "gemma2"] {
        let mut m = Model::load(&fixture(arch), &LoadOptions::default()).unwrap();
        m.set_precision(bf16_here());
        let ids = spread_tokens(m.config().vocab_size);
        let layers = 0..m.config().n_layers;
        let at = |points: fn(usize) -> [HookPoint; 2]| layers.clone().flat_map(points).collect::<Vec<_>>();
        let fused = run_looking_at(&m, &ids, &[]);
        let norms_apart = run_looking_at(&m, &ids, &at(|l| [HookPoint::Ln1Normalized(l), HookPoint::Ln2Normalized(l)]));
        assert!(fused == norms_apart, "{arch}: the norms rounded in one pass differ from their parts");
        let mlp_apart = run_looking_at(&m, &ids, &at(|l| [HookPoint::MlpPre(l), HookPoint::MlpPost(l)]));
        assert!(fused == mlp_apart, "{arch}: the fused bf16 MLP differs from its parts");
        let added_after = run_looking_at(&m, &ids, &at(|l| [HookPoint::AttnOut(l), HookPoint::MlpOut(l)]));
        let err = rel_l2(&fused, &added_after, m.config().d_model, 0);
        println!("{arch}: outputs added in the kernel vs after, last resid_post {err:.2e}");
        assert!(err < 2e-3, "{arch}: adding in the kernel moved resid_post by {err:.2e}");
    }
}

#[test]
fn a_model_of_its_first_blocks_only_runs_bf16() {
    let opts = LoadOptions { blocks: Some(1), ..Default::default() };
    let mut m = Model::load(&fixture("llama"), &opts).unwrap();
    let ids = spread_tokens(m.config().vocab_size);
    let f32_acts = m.run_with_cache(&ids, 1, &[HookPoint::ResidPost(0)]).unwrap().take(&HookPoint::ResidPost(0));
    m.set_precision(bf16_here());
    let bf16_acts = m.run_with_cache(&ids, 1, &[HookPoint::ResidPost(0)]).unwrap().take(&HookPoint::ResidPost(0));
    let (a, b) = (bf16_acts.unwrap(), f32_acts.unwrap());
    let err = rel_l2(&a, &b, m.config().d_model, 0);
    assert!(err > 0.0 && err < 2e-2, "block 0 of a truncated model: bf16 vs f32 {err:.2e}");
}

/// The issue asked that activations computed with bf16 products differ from the f32 ones by no more than
/// storing the f32 ones in bf16 does (`saekit harvest --dtype bf16`, the default). That does not hold:
/// measured on these 61 tokens (AMX and the scalar reference path alike), layer 15 moves by 4.2e-3
/// (relative L2, rows after position 0) against 1.6e-3 for bf16 storage, 2.6-2.7x; with the sink row
/// 2.0e-3 against 1.3e-3. Every block feeds rounded inputs to four GEMMs and adds their errors to the
/// residual stream, so the error grows with depth where storage rounds once. The bound asserted is 4x,
/// room for another path's summation order and another text; next-token argmax agreement is asserted too.
#[test]
fn smollm2_bf16_layer15_stays_within_4x_of_bf16_storage_rounding() {
    let path = saekit_model::default_model_path();
    assert!(
        path.exists(),
        "the real-model tests need {} (run scripts/fetch-model.sh or set SAEKIT_MODEL)",
        path.display()
    );
    let mut m = Model::load(&path, &LoadOptions::default()).unwrap();
    let text = "The quick brown fox jumps over the lazy dog. Sparse autoencoders decompose the residual stream \
                of a language model into interpretable features. Each feature is a direction in activation \
                space that fires on a recognisable pattern of text, such as French words, code comments, or \
                the names of rivers.";
    let ids = m.tokenizer().encode(text, true).unwrap();
    let point: HookPoint = "blocks.15.hook_resid_post".parse().unwrap();
    let (acts32, logits32) = run(&m, &ids, point);
    m.set_precision(bf16_here());
    let (acts16, logits16) = run(&m, &ids, point);

    let d = m.config().d_model;
    let stored: Vec<f32> = acts32.iter().map(|&x| round_to_bf16(x)).collect();
    // position 0 is the attention sink, marked in every store and skipped by readers; its norm is
    // tens of times a typical row's, so the whole-tensor figures mostly measure that one row
    for skip in [0, 1] {
        let compute = rel_l2(&acts16, &acts32, d, skip);
        let storage = rel_l2(&stored, &acts32, d, skip);
        eprintln!(
            "{} tokens, {}: bf16 compute {compute:.3e}, bf16 storage {storage:.3e} (ratio {:.2})",
            ids.len() - skip,
            if skip == 0 { "all rows" } else { "without position 0" },
            compute / storage
        );
    }
    let vocab = m.config().vocab_size;
    let agree = logits32.chunks(vocab).zip(logits16.chunks(vocab)).filter(|(a, b)| argmax(a) == argmax(b)).count();
    let n = ids.len();
    eprintln!("bf16 path {:?}", m.precision());
    eprintln!("next-token argmax: {agree} of {n} positions agree; logits {:.3e}", rel_l2(&logits16, &logits32, d, 0));

    let (compute, storage) = (rel_l2(&acts16, &acts32, d, 1), rel_l2(&stored, &acts32, d, 1));
    assert!(compute <= 4.0 * storage, "bf16 compute moved layer 15 by {compute:.3e}, storage by {storage:.3e}");
    assert!(agree * 100 >= n * 95, "next-token argmax agrees on {agree} of {n} positions");
}

/// `fixture(arch)` with every float tensor rewritten in bf16, as most models are published, in `dir`.
fn bf16_copy(arch: &str, dir: &Path) {
    use safetensors::{tensor::TensorView, Dtype, SafeTensors};
    for e in std::fs::read_dir(fixture(arch)).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap();
        if p.is_file() && p.extension().is_none_or(|x| x != "safetensors") {
            std::fs::copy(&p, dir.join(name)).unwrap();
        }
    }
    let bytes = std::fs::read(fixture(arch).join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let converted: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            assert_eq!(t.dtype(), Dtype::F32, "{arch}: {name} is not f32");
            let data = t
                .data()
                .chunks_exact(4)
                .flat_map(|c| half::bf16::from_f32(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes());
            (name, t.shape().to_vec(), data.collect())
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = converted
        .iter()
        .map(|(n, shape, data)| (n.clone(), TensorView::new(Dtype::BF16, shape.clone(), data).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

/// A model published in bf16 and loaded at bf16 is packed block by block as it loads and keeps no f32
/// copy of its linear weights (a first-blocks model keeps its embedding in the file, too); it must run
/// exactly as the same model loaded at f32 and switched to bf16 afterwards, whose weights went through
/// the f32 copies, and return to that model's f32 pass bit for bit.
#[test]
fn a_bf16_model_loaded_at_bf16_holds_no_f32_copy_and_runs_as_one_switched_after_loading() {
    for arch in ["llama", "gemma2", "pythia"] {
        let dir = tempfile::tempdir().unwrap();
        bf16_copy(arch, dir.path());
        let at_bf16 = LoadOptions { precision: bf16_here(), ..Default::default() };
        let mut direct = Model::load(dir.path(), &at_bf16).unwrap();
        let plain = Model::load(dir.path(), &LoadOptions::default()).unwrap();
        let mut switched = Model::load(dir.path(), &LoadOptions::default()).unwrap();
        let (ids, last) =
            (spread_tokens(direct.config().vocab_size), HookPoint::ResidPost(direct.config().n_layers - 1));
        let f32_pass = run(&plain, &ids, last);
        switched.set_precision(bf16_here());
        assert_eq!(direct.precision(), bf16_here());
        assert!(run(&direct, &ids, last) == run(&switched, &ids, last), "{arch}: bf16 passes differ");
        if arch == "llama" {
            let (w16, w32) = (direct.rms_block_weights(0).unwrap().wqkv, plain.rms_block_weights(0).unwrap().wqkv);
            assert_eq!(w32.bytes(), 4 * w32.rows * w32.cols);
            assert!(w16.bytes() < 4 * w16.rows * w16.cols, "{arch}: the bf16-loaded model holds an f32 copy");
            assert_eq!(w16.values(), w32.values(), "{arch}: the packed weight does not unpack to its values");
        }

        let first = LoadOptions { blocks: Some(1), ..at_bf16.clone() };
        let head_less = Model::load(dir.path(), &first).unwrap();
        let point = [HookPoint::ResidPost(0)];
        let got = head_less.run_with_cache(&ids, 1, &point).unwrap().take(&point[0]);
        let want = switched.run_with_cache(&ids, 1, &point).unwrap().take(&point[0]);
        assert!(got.is_some() && got == want, "{arch}: the first block from the mapped embedding differs");
        assert_eq!(head_less.unembedding(), plain.unembedding(), "{arch}: mapped embedding decodes differently");

        direct.set_precision(Precision::F32);
        assert!(run(&direct, &ids, last) == f32_pass, "{arch}: back at f32 the pass differs");
    }
}
