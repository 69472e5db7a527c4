//! Finding features by concept: which features fire on a text, which separate two sets of texts,
//! and how well the best single feature predicts a label (sparse probing).
//!
//! Each text is run through the model to the SAE's hook (with BOS when the tokenizer adds one) and
//! encoded; attention-sink rows (position 0, special tokens) are skipped. A text's value for a
//! feature is its max activation over the text's tokens.
//!
//! Statistic for `--pos/--neg` and probing: AUROC of that per-text max activation between the two
//! sets (the Mann-Whitney U / (n_pos n_neg), ties counted half, so a feature that never fires on
//! either scores 0.5), with firing frequencies in each set and a two-proportion z-score of the
//! frequency difference shown beside it.

use crate::error::{bail_input, AnalysisResult};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::Context as _;
use saekit_model::{HookPoint, Model};
use saekit_sae::Sae;
use serde::Serialize;

use crate::analyze::{sink_mask, SINK_NORM_FACTOR};

/// A text's features: (feature, max activation over its tokens), sorted by feature id.
pub type TextFeatures = Vec<(u32, f32)>;

/// Encode each token of `text`: the tokens and, per token, its (feature, activation) list
/// (empty for skipped sink rows).
pub fn encode_text(
    model: &Model,
    sae: &Sae,
    hook: HookPoint,
    text: &str,
    max_tokens: usize,
) -> AnalysisResult<(Vec<u32>, Vec<TextFeatures>)> {
    let mut ids = model.tokenizer().encode(text, true)?;
    ids.truncate(max_tokens.max(1));
    if ids.is_empty() {
        return Ok((ids, Vec::new()));
    }
    let mut cache = model.run_with_cache(&ids, 1, &[hook])?;
    let x = cache.take(&hook).context("internal: hook not captured")?;
    let codes = sae.encode(&x);
    let skip = sink_mask(model, &ids, ids.len(), &x, sae.d_in, SINK_NORM_FACTOR);
    let per = (0..ids.len())
        .map(|r| {
            if skip[r] {
                return Vec::new();
            }
            let (i, v) = codes.row(r);
            i.iter().copied().zip(v.iter().copied()).filter(|p| p.1 > 0.0).collect()
        })
        .collect();
    Ok((ids, per))
}

fn max_per_feature(per: &[Vec<(u32, f32)>]) -> TextFeatures {
    let mut m: BTreeMap<u32, f32> = BTreeMap::new();
    for row in per {
        for &(j, v) in row {
            let e = m.entry(j).or_insert(0.0);
            *e = e.max(v);
        }
    }
    m.into_iter().collect()
}

/// Per-text max activations of every feature that fires.
pub fn text_features(
    model: &Model,
    sae: &Sae,
    hook: HookPoint,
    texts: &[String],
    max_tokens: usize,
) -> AnalysisResult<Vec<TextFeatures>> {
    let pb = indicatif::ProgressBar::new(texts.len() as u64);
    if texts.len() < 50 {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let out = texts
        .iter()
        .map(|t| {
            pb.inc(1);
            encode_text(model, sae, hook, t, max_tokens).map(|(_, per)| max_per_feature(&per))
        })
        .collect();
    pb.finish_and_clear();
    out
}

/// One token of a searched text and the features that fire on it.
#[derive(Debug, Clone, Serialize)]
pub struct TokenHits {
    /// The token's text (dangling bytes of a split character escaped as `\xNN`).
    pub token: String,
    /// The token id.
    pub id: u32,
    /// Strongest features on this token, (feature, activation), best first.
    pub features: Vec<(u32, f32)>,
}

/// One feature's activity over a whole searched text.
#[derive(Debug, Clone, Serialize)]
pub struct FeatureHit {
    /// The feature id.
    pub id: u32,
    /// Its highest activation on any token of the text.
    pub max_act: f32,
    /// Its activations summed over the text's tokens (the overall ranking key).
    pub sum_act: f32,
    /// Tokens of the text it fired on.
    pub n_tokens: usize,
    /// Its max over the text relative to its max in the feature database (when one is given).
    pub frac_of_db_max: Option<f32>,
}

/// What [`search_text`] finds on a text: per token, and over the whole text.
#[derive(Debug, Clone, Serialize)]
pub struct TextSearch {
    /// Every token of the text, in order, with its strongest features.
    pub tokens: Vec<TokenHits>,
    /// Features ranked by summed activation over the text.
    pub overall: Vec<FeatureHit>,
}

/// Features on `text`, per token (top `per_token`) and overall (top `overall`, by summed activation).
pub fn search_text(
    model: &Model,
    sae: &Sae,
    hook: HookPoint,
    text: &str,
    per_token: usize,
    overall: usize,
    db_max: Option<&dyn Fn(u32) -> Option<f32>>,
) -> AnalysisResult<TextSearch> {
    let (ids, per) = encode_text(model, sae, hook, text, 4096)?;
    let mut tokens = Vec::with_capacity(ids.len());
    let mut agg: HashMap<u32, (f32, f32, usize)> = HashMap::new();
    for (r, &id) in ids.iter().enumerate() {
        let mut f = per.get(r).cloned().unwrap_or_default();
        for &(j, v) in &f {
            let e = agg.entry(j).or_insert((0.0, 0.0, 0));
            e.0 = e.0.max(v);
            e.1 += v;
            e.2 += 1;
        }
        f.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        f.truncate(per_token);
        tokens.push(TokenHits { token: model.tokenizer().token_text(id), id, features: f });
    }
    let mut hits: Vec<FeatureHit> = agg
        .into_iter()
        .map(|(id, (max_act, sum_act, n_tokens))| FeatureHit {
            id,
            max_act,
            sum_act,
            n_tokens,
            frac_of_db_max: db_max.and_then(|f| f(id)).filter(|m| *m > 0.0).map(|m| max_act / m),
        })
        .collect();
    hits.sort_by(|a, b| b.sum_act.total_cmp(&a.sum_act).then(a.id.cmp(&b.id)));
    hits.truncate(overall);
    Ok(TextSearch { tokens, overall: hits })
}

/// How well one feature separates the positive texts from the negative ones in [`contrast`]; a text's
/// value is the feature's max activation over its tokens (0 when it does not fire).
#[derive(Debug, Clone, Serialize)]
pub struct ContrastHit {
    /// The feature id.
    pub id: u32,
    /// P(value on a positive text > value on a negative text), ties half.
    pub auroc: f64,
    /// Fraction of the positive texts it fires on.
    pub freq_pos: f64,
    /// Fraction of the negative texts it fires on.
    pub freq_neg: f64,
    /// Two-proportion z-score of freq_pos − freq_neg (pooled).
    pub z: f64,
    /// Mean value over the positive texts (0 for those it does not fire on).
    pub mean_pos: f64,
    /// Mean value over the negative texts.
    pub mean_neg: f64,
    /// The tie-breaker among equal AUROCs: the gap between the mean activation on positive and on
    /// negative texts relative to the feature's scale here (its largest value on any of them), in
    /// [-1, 1]. At AUROC 1.0 every feature separates the sets; the one whose positive activations stand
    /// furthest above the negatives, relative to how strongly it can fire, separates them by the widest
    /// margin.
    pub effect: f64,
}

/// AUROC of sparse per-text values (absent = 0) between `pos` and `neg` for feature values given as
/// the non-zero entries of each set.
fn auroc_sparse(pos_nz: &[f32], n_pos: usize, neg_nz: &[f32], n_neg: usize) -> f64 {
    if n_pos == 0 || n_neg == 0 {
        return 0.5;
    }
    let mut v: Vec<(f32, bool)> = pos_nz.iter().map(|&x| (x, true)).chain(neg_nz.iter().map(|&x| (x, false))).collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    let zeros_pos = n_pos - pos_nz.len();
    let zeros = zeros_pos + (n_neg - neg_nz.len());
    // ranks are 1-based; all zeros share the midrank of 1..=zeros
    let mut rank_sum_pos = zeros_pos as f64 * (zeros as f64 + 1.0) / 2.0;
    let mut i = 0;
    while i < v.len() {
        let mut k = i;
        while k < v.len() && v[k].0 == v[i].0 {
            k += 1;
        }
        let mid = zeros as f64 + (i + 1 + k) as f64 / 2.0;
        rank_sum_pos += mid * v[i..k].iter().filter(|x| x.1).count() as f64;
        i = k;
    }
    let u = rank_sum_pos - (n_pos * (n_pos + 1)) as f64 / 2.0;
    u / (n_pos as f64 * n_neg as f64)
}

/// Rank features by how well they separate `pos` from `neg` texts: AUROC, best first, ties broken by
/// [`ContrastHit::effect`], then the z-score, then id.
pub fn contrast(pos: &[TextFeatures], neg: &[TextFeatures]) -> Vec<ContrastHit> {
    let mut vals: HashMap<u32, (Vec<f32>, Vec<f32>)> = HashMap::new();
    for t in pos {
        for &(j, v) in t {
            vals.entry(j).or_default().0.push(v);
        }
    }
    for t in neg {
        for &(j, v) in t {
            vals.entry(j).or_default().1.push(v);
        }
    }
    let (np, nn) = (pos.len(), neg.len());
    let mut out: Vec<ContrastHit> = vals
        .into_iter()
        .map(|(id, (p, n))| {
            let fp = p.len() as f64 / np.max(1) as f64;
            let fneg = n.len() as f64 / nn.max(1) as f64;
            let pooled = (p.len() + n.len()) as f64 / (np + nn).max(1) as f64;
            let se = (pooled * (1.0 - pooled) * (1.0 / np.max(1) as f64 + 1.0 / nn.max(1) as f64)).sqrt();
            // `+ 0.0` turns a negative zero into zero (an empty f64 sum is -0.0): it must never print as -0.0
            let mean_pos = p.iter().map(|&x| x as f64).sum::<f64>() / np.max(1) as f64 + 0.0;
            let mean_neg = n.iter().map(|&x| x as f64).sum::<f64>() / nn.max(1) as f64 + 0.0;
            let scale = p.iter().chain(&n).fold(0f32, |m, &x| m.max(x.abs())) as f64;
            let effect = if scale > 0.0 { (mean_pos - mean_neg) / scale + 0.0 } else { 0.0 };
            ContrastHit {
                id,
                auroc: auroc_sparse(&p, np, &n, nn),
                freq_pos: fp,
                freq_neg: fneg,
                z: if se > 0.0 { (fp - fneg) / se + 0.0 } else { 0.0 },
                mean_pos,
                mean_neg,
                effect,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        b.auroc.total_cmp(&a.auroc).then(b.effect.total_cmp(&a.effect)).then(b.z.total_cmp(&a.z)).then(a.id.cmp(&b.id))
    });
    out
}

/// Each vocabulary token's share of the `pos` texts' tokens minus its share of the `neg` texts' (the
/// first `max_tokens` tokens of each text, special tokens left out): the tokens steering toward `pos`
/// should raise, as weights for `saekit_steer::LiftProbe`.
pub fn token_share_difference(
    model: &Model,
    pos: &[String],
    neg: &[String],
    max_tokens: usize,
) -> AnalysisResult<Vec<f64>> {
    let shares = |texts: &[String]| -> AnalysisResult<Vec<f64>> {
        let counts = token_counts(model, texts, max_tokens)?;
        let total = counts.iter().sum::<f64>().max(1.0);
        Ok(counts.into_iter().map(|c| c / total).collect())
    };
    Ok(shares(pos)?.into_iter().zip(shares(neg)?).map(|(p, n)| p - n).collect())
}

/// How often each token id occurs in `texts` (their first `max_tokens` tokens, special tokens left out).
fn token_counts(model: &Model, texts: &[String], max_tokens: usize) -> AnalysisResult<Vec<f64>> {
    let tok = model.tokenizer();
    let mut counts = vec![0f64; model.config().vocab_size];
    for t in texts {
        let mut ids = tok.encode(t, false)?;
        ids.truncate(max_tokens);
        for id in ids.into_iter().filter(|&id| !tok.is_special(id)) {
            if let Some(c) = counts.get_mut(id as usize) {
                *c += 1.0;
            }
        }
    }
    Ok(counts)
}

/// One label's single-feature probe from [`probe`]: the feature that best tells texts with the label
/// from the rest, and how well it does on texts it was not chosen on.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeResult {
    /// The label probed (one-vs-rest).
    pub label: String,
    /// Texts with the label (train and test halves).
    pub n_pos: usize,
    /// Texts without it.
    pub n_neg: usize,
    /// The single feature with the best train AUROC (one-vs-rest).
    pub feature: u32,
    /// Its AUROC on the train half, oriented (`max(AUROC, 1 − AUROC)`).
    pub train_auroc: f64,
    /// Its AUROC on the test half, in the orientation chosen on train.
    pub test_auroc: f64,
    /// Accuracy on the test half with the threshold that maximised train accuracy.
    pub test_accuracy: f64,
    /// Accuracy of always predicting the majority class on the test half.
    pub test_majority_baseline: f64,
    /// The max-activation threshold chosen on the train half.
    pub threshold: f32,
    /// Whether the feature predicts the label by being above (true) or below the threshold.
    pub above: bool,
}

/// One-vs-rest single-feature probing: texts are split deterministically (even index = train, odd =
/// test); for each label the feature with the best train AUROC (or 1 − AUROC, for features that
/// mark its absence) is chosen, its train-accuracy-maximising threshold fixed, and both scored on
/// the test half.
pub fn probe(features: &[TextFeatures], labels: &[String]) -> AnalysisResult<Vec<ProbeResult>> {
    if features.len() != labels.len() {
        bail_input!("{} texts but {} labels", features.len(), labels.len());
    }
    let distinct: std::collections::BTreeSet<&String> = labels.iter().collect();
    if distinct.len() < 2 {
        bail_input!("probing needs at least two labels, found {}", distinct.len());
    }
    let train: Vec<usize> = (0..labels.len()).filter(|i| i % 2 == 0).collect();
    let test: Vec<usize> = (0..labels.len()).filter(|i| i % 2 == 1).collect();
    let value = |i: usize, j: u32| -> f32 {
        features[i].binary_search_by_key(&j, |p| p.0).map(|k| features[i][k].1).unwrap_or(0.0)
    };
    let mut out = Vec::new();
    for label in distinct {
        let is = |i: &usize| &labels[*i] == label;
        let (tp, tn): (Vec<usize>, Vec<usize>) = train.iter().partition(|i| is(i));
        let sel = |set: &[usize]| -> Vec<TextFeatures> { set.iter().map(|&i| features[i].clone()).collect() };
        let ranked = contrast(&sel(&tp), &sel(&tn));
        let best = ranked
            .iter()
            .map(|h| (h.id, h.auroc.max(1.0 - h.auroc), h.auroc >= 0.5))
            .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)));
        let Some((feature, train_auroc, above)) = best else { continue };
        // threshold maximising train accuracy over the observed values
        let mut cands: Vec<f32> = train.iter().map(|&i| value(i, feature)).collect();
        // -1 and +inf let the threshold predict one class everywhere (the majority baseline)
        cands.extend([-1.0, 0.0, f32::INFINITY]);
        cands.sort_by(|a, b| a.total_cmp(b));
        cands.dedup();
        let acc = |set: &[usize], thr: f32| -> f64 {
            let ok = set.iter().filter(|&&i| ((value(i, feature) > thr) == above) == is(&i)).count();
            ok as f64 / set.len().max(1) as f64
        };
        let threshold = cands.iter().copied().max_by(|&a, &b| acc(&train, a).total_cmp(&acc(&train, b))).unwrap_or(0.0);
        let (sp, sn): (Vec<usize>, Vec<usize>) = test.iter().partition(|i| is(i));
        let vals = |s: &[usize]| -> Vec<f32> { s.iter().map(|&i| value(i, feature)).filter(|v| *v > 0.0).collect() };
        let a = auroc_sparse(&vals(&sp), sp.len(), &vals(&sn), sn.len());
        let maj = sp.len().max(sn.len()) as f64 / test.len().max(1) as f64;
        out.push(ProbeResult {
            label: label.clone(),
            n_pos: tp.len() + sp.len(),
            n_neg: tn.len() + sn.len(),
            feature,
            train_auroc,
            test_auroc: if above { a } else { 1.0 - a },
            test_accuracy: acc(&test, threshold),
            test_majority_baseline: maj,
            threshold,
            above,
        });
    }
    Ok(out)
}

/// Texts from a file: JSONL (`text` field) when it ends in `.jsonl`, else one text per non-empty line.
pub fn read_texts(path: &Path) -> AnalysisResult<Vec<String>> {
    Ok(read_labelled(path, None)?.into_iter().map(|(t, _)| t).collect())
}

/// `(text, label)` pairs from JSONL with `text` and `label_field` fields (or plain lines, label empty).
pub fn read_labelled(path: &Path, label_field: Option<&str>) -> AnalysisResult<Vec<(String, String)>> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let jsonl = path.extension().is_some_and(|e| e == "jsonl" || e == "json");
    let mut out = Vec::new();
    for (n, line) in s.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if !jsonl {
            if label_field.is_some() {
                bail_input!("{}: labelled sets must be JSONL with text and label fields", path.display());
            }
            out.push((line.to_string(), String::new()));
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}:{}: not valid JSON", path.display(), n + 1))?;
        let text = v
            .get("text")
            .and_then(|t| t.as_str())
            .with_context(|| format!("{}:{}: no string field \"text\"", path.display(), n + 1))?;
        let label = match label_field {
            Some(f) => match v.get(f) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(x) if !x.is_null() => x.to_string(),
                _ => bail_input!("{}:{}: no field {f:?}", path.display(), n + 1),
            },
            None => String::new(),
        };
        out.push((text.to_string(), label));
    }
    if out.is_empty() {
        bail_input!("{}: no texts", path.display());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_matches_the_definition() {
        // pos values [0, 2, 3], neg values [0, 0, 1]
        let a = auroc_sparse(&[2.0, 3.0], 3, &[1.0], 3);
        // pairs: (0 vs 0,0,1): 0.5+0.5+0 ; (2 vs ...): 3 ; (3 vs ...): 3  => 7 / 9
        assert!((a - 7.0 / 9.0).abs() < 1e-12, "{a}");
        assert_eq!(auroc_sparse(&[], 4, &[], 5), 0.5);
        assert!((auroc_sparse(&[1.0, 1.0], 2, &[1.0], 1) - 0.5).abs() < 1e-12);
    }

    /// Against the definition itself: over every (positive, negative) pair, 1 when the positive is larger
    /// and 1/2 on a tie (zeros included), in f64, on random sparse values with many ties.
    #[test]
    fn auroc_equals_the_pairwise_count() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for _ in 0..200 {
            let (np, nn) = (rng.gen_range(1..30), rng.gen_range(1..30));
            let mut draw = |n: usize| -> Vec<f32> {
                (0..n).map(|_| if rng.gen_bool(0.4) { 0.0 } else { rng.gen_range(1..6) as f32 * 0.5 }).collect()
            };
            let (pos, neg) = (draw(np), draw(nn));
            let mut wins = 0.0f64;
            for &p in &pos {
                for &n in &neg {
                    wins += if p > n {
                        1.0
                    } else if p == n {
                        0.5
                    } else {
                        0.0
                    };
                }
            }
            let nz = |v: &[f32]| v.iter().copied().filter(|&x| x != 0.0).collect::<Vec<f32>>();
            let a = auroc_sparse(&nz(&pos), np, &nz(&neg), nn);
            assert!((a - wins / (np * nn) as f64).abs() < 1e-12, "{a} vs {}", wins / (np * nn) as f64);
        }
    }

    #[test]
    fn contrast_and_probe_find_the_planted_feature() {
        let mut feats = Vec::new();
        let mut labels = Vec::new();
        for i in 0..40u32 {
            let fr = (i / 2) % 2 == 0;
            let mut f = vec![(1u32, 0.5f32 + (i % 3) as f32)];
            if fr {
                f.push((7, 2.0 + (i % 5) as f32));
            }
            feats.push(f);
            labels.push(if fr { "fr".to_string() } else { "en".to_string() });
        }
        let (p, n): (Vec<_>, Vec<_>) = feats.iter().cloned().zip(&labels).partition(|(_, l)| *l == "fr");
        let hits =
            contrast(&p.into_iter().map(|x| x.0).collect::<Vec<_>>(), &n.into_iter().map(|x| x.0).collect::<Vec<_>>());
        assert_eq!(hits[0].id, 7);
        assert!((hits[0].auroc - 1.0).abs() < 1e-12);
        let r = probe(&feats, &labels).unwrap();
        assert_eq!(r.len(), 2);
        assert!(r.iter().all(|x| x.feature == 7 && x.test_accuracy == 1.0), "{r:?}");
    }

    #[test]
    fn auroc_ties_are_broken_by_the_effect_size() {
        // three features separate the sets perfectly (AUROC 1); the ids are in the opposite order of
        // their margins: feature 2 fires far above its negatives relative to its scale, feature 9 barely
        let pos: Vec<TextFeatures> = (0..6).map(|i| vec![(2, 10.0 + i as f32), (5, 4.0), (9, 1.05)]).collect();
        let neg: Vec<TextFeatures> = (0..6).map(|_| vec![(5, 1.0), (9, 1.0), (11, 3.0)]).collect();
        let hits = contrast(&pos, &neg);
        let top: Vec<u32> = hits.iter().take(3).map(|h| h.id).collect();
        assert_eq!(top, [2, 5, 9]);
        assert!(hits[..3].iter().all(|h| h.auroc == 1.0));
        // the independent definition: (mean pos − mean neg) / largest value
        assert!((hits[1].effect - (4.0 - 1.0) / 4.0).abs() < 1e-12, "{:?}", hits[1]);
        assert!((hits[0].effect - 12.5 / 15.0).abs() < 1e-12, "{:?}", hits[0]);
        // a feature equal on both sides has effect and z exactly 0, never -0.0
        let same: Vec<TextFeatures> = (0..4).map(|_| vec![(3, 1.0)]).collect();
        let h = &contrast(&same, &same)[0];
        assert!(h.effect.is_sign_positive() && h.z.is_sign_positive() && h.effect == 0.0, "{h:?}");
        assert_eq!(format!("{:.2}", h.z), "0.00");
        // feature 2 never fires on a negative text: its negative mean is 0, printed as 0.000
        assert_eq!(format!("{:.3}", hits[0].mean_neg), "0.000", "{:?}", hits[0]);
    }
}
