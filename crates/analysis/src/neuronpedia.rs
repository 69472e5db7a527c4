//! A feature database in Neuronpedia's export layout, the one `neuronpedia_utils/export-data.py` writes and
//! its importer reads:
//!
//! ```text
//! OUT/{modelId}/{sourceId}/model.jsonl, source.jsonl, sourceset.jsonl
//! OUT/{modelId}/{sourceId}/features/batch-N.jsonl.gz       one Neuron row per feature (1024 per batch)
//! OUT/{modelId}/{sourceId}/explanations/batch-N.jsonl.gz   Explanation rows of those features
//! OUT/{modelId}/{sourceId}/activations/batch-N.jsonl.gz    Activation rows (top and quantile contexts)
//! ```
//!
//! Field names and types are those of Neuronpedia's database models (`Neuron`, `Explanation`,
//! `Activation`), with exactly the columns their export writes. What saekit does not compute (logit
//! histograms, neuron alignment, correlations, DFA) is written empty or null, as their own exports do for
//! sources without it.

use crate::error::{bail_input, AnalysisResult};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

use crate::{Context, FeatureDb, FeatureRecord};

/// Features (and their explanations and activations) per batch file, as Neuronpedia's export.
pub(crate) const BATCH: u32 = 1024;

/// The ids Neuronpedia files a source under: they name the output folders and fill the `modelId`,
/// and `layer` fields of every row.
#[derive(Debug, Clone)]
pub struct NeuronpediaIds {
    /// Neuronpedia's model id, e.g. `smollm2-135m-instruct`.
    pub model_id: String,
    /// The source (SAE) id, `{layer}-{set}`, e.g. `6-saekit-res`.
    pub source_id: String,
    /// The source set name, e.g. `saekit-res`.
    pub set_name: String,
}

/// What [`export`] wrote.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ExportReport {
    /// The source's folder, `OUT/{modelId}/{sourceId}`.
    pub dir: PathBuf,
    /// `Neuron` rows written (one per feature).
    pub features: u64,
    /// `Explanation` rows written (every LLM explanation `saekit explain` stored).
    pub explanations: u64,
    /// `Activation` rows written (top and quantile contexts).
    pub activations: u64,
    /// Batch files per table (`batch-0` ..).
    pub batches: u32,
}

/// Write the export of `db` (with the SAE's decoder rows as the feature vectors) under `out`.
pub fn export(
    db: &FeatureDb,
    w_dec: &[f32],
    d_in: usize,
    ids: &NeuronpediaIds,
    out: &Path,
) -> AnalysisResult<ExportReport> {
    let info = db.info()?;
    let n = info.d_sae;
    if w_dec.len() != n as usize * d_in {
        bail_input!("the SAE's decoder has {} rows but the database describes {n} features", w_dec.len() / d_in.max(1));
    }
    let dir = out.join(&ids.model_id).join(&ids.source_id);
    for sub in ["features", "explanations", "activations"] {
        std::fs::create_dir_all(dir.join(sub)).with_context(|| format!("creating {}", dir.join(sub).display()))?;
    }
    let now = iso_now();
    let one_line = |name: &str, v: Value| -> Result<()> {
        let p = dir.join(name);
        saekit_files::write_atomic(&p, format!("{v}\n").as_bytes())
    };
    one_line(
        "model.jsonl",
        json!({"id": ids.model_id, "displayName": info.model, "creatorId": null, "createdAt": now, "updatedAt": now,
               "layers": null, "neuronsPerLayer": n, "owner": "saekit", "visibility": "PUBLIC", "inferenceEnabled": false}),
    )?;
    one_line(
        "sourceset.jsonl",
        json!({"modelId": ids.model_id, "name": ids.set_name, "type": "saekit", "description": format!("saekit SAE on {}", info.hook),
               "creatorName": "saekit", "creatorId": null, "createdAt": now, "visibility": "PUBLIC", "hasDashboards": true}),
    )?;
    one_line(
        "source.jsonl",
        json!({"id": ids.source_id, "modelId": ids.model_id, "setName": ids.set_name, "hookName": info.hook,
               "creatorId": null, "createdAt": now, "visibility": "PUBLIC", "hasDashboards": true, "inferenceEnabled": false}),
    )?;
    let mut report = ExportReport { dir: dir.clone(), ..Default::default() };
    for b in 0..n.div_ceil(BATCH) {
        let (mut feats, mut expls, mut acts) = (Vec::new(), Vec::new(), Vec::new());
        for id in b * BATCH..((b + 1) * BATCH).min(n) {
            let Some(f) = db.feature(id)? else { continue };
            let vector = &w_dec[id as usize * d_in..][..d_in];
            feats.push(neuron_row(&f, vector, &info.hook, ids));
            for (k, e) in f.explanations.iter().enumerate() {
                expls.push(json!({
                    "id": cuid(&[&ids.model_id, &ids.source_id, "expl", &id.to_string(), &k.to_string()]),
                    "modelId": ids.model_id, "layer": ids.source_id, "index": id.to_string(),
                    "authorId": null, "description": e.text, "embedding": null,
                    "typeName": "saekit-delphi", "explanationModelName": e.model,
                    "umap_x": null, "umap_y": null, "umap_cluster": null, "umap_log_feature_sparsity": null,
                }));
            }
            let bins =
                f.quantiles.iter().flat_map(|q| q.contexts.iter().map(move |c| (c, Some((q.lo, q.hi, q.count)))));
            for (k, (c, bin)) in f.top_contexts.iter().map(|c| (c, None)).chain(bins).enumerate() {
                acts.push(activation_row(c, bin, id, k, ids));
            }
        }
        report.features += feats.len() as u64;
        report.explanations += expls.len() as u64;
        report.activations += acts.len() as u64;
        write_gz(&dir.join(format!("features/batch-{b}.jsonl.gz")), &feats)?;
        write_gz(&dir.join(format!("explanations/batch-{b}.jsonl.gz")), &expls)?;
        write_gz(&dir.join(format!("activations/batch-{b}.jsonl.gz")), &acts)?;
        report.batches += 1;
    }
    Ok(report)
}

fn neuron_row(f: &FeatureRecord, vector: &[f32], hook: &str, ids: &NeuronpediaIds) -> Value {
    // histogram bars at the bin centres (geometric, the bins are log-spaced); only non-empty bins
    let h = &f.histogram;
    let (mut heights, mut values) = (Vec::new(), Vec::new());
    for (i, &c) in h.counts.iter().enumerate() {
        if c > 0 && i + 1 < h.edges.len() {
            heights.push(c as f64);
            values.push(((h.edges[i].max(1e-12) as f64) * (h.edges[i + 1].max(1e-12) as f64)).sqrt());
        }
    }
    json!({
        "modelId": ids.model_id,
        "layer": ids.source_id,
        "index": f.id.to_string(),
        "maxActApprox": f.max_act,
        "creatorId": null,
        "frac_nonzero": f.density,
        "freq_hist_data_bar_heights": heights,
        "freq_hist_data_bar_values": values,
        "logits_hist_data_bar_heights": [],
        "logits_hist_data_bar_values": [],
        "neuron_alignment_indices": [],
        "neuron_alignment_l1": [],
        "neuron_alignment_values": [],
        "correlated_neurons_indices": [],
        "correlated_neurons_l1": [],
        "correlated_neurons_pearson": [],
        "decoder_weights_dist": [],
        "neg_str": f.suppressed.iter().map(|t| t.token.clone()).collect::<Vec<_>>(),
        "neg_values": f.suppressed.iter().map(|t| t.logit).collect::<Vec<_>>(),
        "pos_str": f.promoted.iter().map(|t| t.token.clone()).collect::<Vec<_>>(),
        "pos_values": f.promoted.iter().map(|t| t.logit).collect::<Vec<_>>(),
        "sourceSetName": ids.set_name,
        "topkCosSimIndices": f.neighbours.iter().map(|n| n.id).collect::<Vec<_>>(),
        "topkCosSimValues": f.neighbours.iter().map(|n| n.cosine).collect::<Vec<_>>(),
        "vector": vector,
        "vectorLabel": null,
        "hookName": hook,
        "vectorDefaultSteerStrength": null,
        "hasVector": true,
    })
}

fn activation_row(c: &Context, bin: Option<(f32, f32, u64)>, id: u32, k: usize, ids: &NeuronpediaIds) -> Value {
    let min = c.acts.iter().copied().fold(f32::INFINITY, f32::min);
    json!({
        "id": cuid(&[&ids.model_id, &ids.source_id, "act", &id.to_string(), &k.to_string()]),
        "modelId": ids.model_id,
        "layer": ids.source_id,
        "index": id.to_string(),
        "creatorId": null,
        "dataSource": null,
        "tokens": c.tokens,
        "maxValue": c.max_act,
        "minValue": if min.is_finite() { min } else { 0.0 },
        "values": c.acts,
        "maxValueTokenIndex": c.peak,
        "dfaValues": [],
        "dfaMaxValue": null,
        "dfaTargetIndex": null,
        "binContains": bin.map(|b| b.2),
        "binMin": bin.map(|b| b.0),
        "binMax": bin.map(|b| b.1),
    })
}

/// A stable id in the cuid shape Neuronpedia's ids have (`c` then 24 lowercase alphanumerics).
fn cuid(parts: &[&str]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut g: u64 = 0x8422_2325_cbf2_9ce4;
    for b in parts.join("/").bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        g = (g ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(7);
    }
    format!("c{:012x}{:012x}", h & 0xffff_ffff_ffff, g & 0xffff_ffff_ffff)
}

fn iso_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // civil date from days since 1970-01-01 (Howard Hinnant's algorithm)
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.000Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// One JSON object per line, gzip-compressed, written atomically.
fn write_gz(path: &Path, rows: &[Value]) -> Result<()> {
    saekit_files::write_atomic_with(path, |f| {
        let mut gz = flate2::write::GzEncoder::new(std::io::BufWriter::new(f), flate2::Compression::new(5));
        for r in rows {
            writeln!(gz, "{r}")?;
        }
        gz.finish()?.flush()?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_dates_have_neuronpedia_shapes() {
        let id = cuid(&["m", "s", "act", "3", "0"]);
        assert_eq!(id.len(), 25);
        assert!(id.starts_with('c') && id[1..].chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(id, cuid(&["m", "s", "act", "3", "1"]));
        let t = iso_now();
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
    }
}
