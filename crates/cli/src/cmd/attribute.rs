//! `saekit attribute`: the attribution graph of one prompt through a transcoder replacement model.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use saekit_circuits::graph_json::{write_graph_files, GraphMeta};
use saekit_circuits::{attribute, intervene, top_tokens, AttributeOptions, Intervention, TranscoderSet};
use saekit_model::Model;

use super::model_arg::ModelArgs;

/// Trace which transcoder features cause which on a prompt (attention patterns and norm denominators
/// frozen, every edge linear), prune by influence as circuit-tracer does, and write the graph in
/// circuit-tracer's / Neuronpedia's JSON: `--out` the pruned graph; `<stem>.full.safetensors` the full one
/// (circuit-tracer's `Graph` tensors: the adjacency matrix, active features, tokens and logits).
/// Llama-family models only.
///
/// Examples:
///   saekit train-transcoders --layers 0-29 --contexts tokens/ --skip --d-sae 4096 --tokens 600k --out tc/
///   saekit attribute --transcoders tc/ --prompt "The capital of France is" --out graph.json
///   saekit attribute --transcoders tc/ --prompt "The capital of France is" --out graph.json --ablate 1234@12:4
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct AttributeArgs {
    /// A transcoder set: circuit-tracer's transcoders.yaml folder, or SAELens transcoder folders.
    #[arg(long)]
    pub transcoders: PathBuf,
    /// The text to trace, tokenized as the model does (with its BOS when it has one); the graph explains
    /// the logits at its last token.
    #[arg(long)]
    pub prompt: String,
    /// Logit targets: the most likely next tokens.
    #[arg(long, default_value_t = 5)]
    pub target_logits: usize,
    /// Keep the nodes holding this share of the influence on the logits.
    #[arg(long, default_value_t = 0.8)]
    pub node_threshold: f32,
    /// Keep the edges holding this share of the influence.
    #[arg(long, default_value_t = 0.98)]
    pub edge_threshold: f32,
    /// At most this many feature nodes (the largest activations; the rest count as error).
    #[arg(long, default_value_t = 7500)]
    pub max_feature_nodes: usize,
    /// The graph's name in its metadata (default: the output file's stem).
    #[arg(long)]
    pub slug: Option<String>,
    /// The pruned graph's JSON (Neuronpedia's viewer and `saekit serve` read it); the full graph goes
    /// beside it as `<stem>.full.safetensors`.
    #[arg(long)]
    pub out: PathBuf,
    /// Ablate a feature node, `FEATURE@LAYER:POSITION` (repeatable): the real model re-runs with it at 0
    /// and the new top logits are printed.
    #[arg(long)]
    pub ablate: Vec<Intervention>,
    /// Clamp a feature node, `FEATURE@LAYER:POSITION=VALUE` (repeatable), as --ablate.
    #[arg(long)]
    pub clamp: Vec<Intervention>,
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn run(a: AttributeArgs) -> Result<()> {
    let set = TranscoderSet::load(&a.transcoders)?;
    let model = a.model.load()?;
    let tokens = model.tokenizer().encode(&a.prompt, true)?;
    let opts = AttributeOptions {
        target_logits: a.target_logits,
        max_feature_nodes: a.max_feature_nodes,
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    let g = attribute(&model, &set, &tokens, &opts)?;
    let text = |t: u32| model.tokenizer().decode(&[t]);
    let meta = GraphMeta {
        slug: a
            .slug
            .clone()
            .unwrap_or_else(|| a.out.file_stem().map_or("graph".into(), |s| s.to_string_lossy().into_owned())),
        scan: set.scan.clone(),
        prompt: a.prompt.clone(),
        prompt_tokens: tokens.iter().map(|&t| text(t)).collect::<Result<_>>()?,
        logit_tokens: g.logits.iter().map(|l| text(l.token)).collect::<Result<_>>()?,
        node_threshold: a.node_threshold,
    };
    let files = write_graph_files(&g, &meta, &a.out, a.node_threshold, a.edge_threshold)?;
    println!(
        "{} tokens, {} feature nodes, {} logit targets in {:.1}s",
        tokens.len(),
        g.features.len(),
        g.logits.len(),
        t0.elapsed().as_secs_f32()
    );
    println!("pruned graph: {} nodes, {} links -> {}", files.pruned_nodes, files.pruned_links, files.pruned.display());
    println!(
        "full graph:   {} nodes, {} non-zero edges -> {}",
        files.full_nodes,
        files.full_links,
        files.full.display()
    );
    println!("influence through error nodes: {:.1}%", 100.0 * files.error_influence_share);
    let edits: Vec<Intervention> = a.ablate.iter().chain(&a.clamp).copied().collect();
    if !edits.is_empty() {
        print_intervention(&model, &set, &tokens, &edits)?;
    }
    Ok(())
}

/// The top next tokens of the real model before and after the edits.
fn print_intervention(model: &Model, set: &TranscoderSet, tokens: &[u32], edits: &[Intervention]) -> Result<()> {
    let before = intervene(model, set, tokens, &[])?;
    let after = intervene(model, set, tokens, edits)?;
    let show = |logits: &[f32]| -> Result<String> {
        let tops =
            top_tokens(logits, 5).into_iter().map(|(t, p)| Ok(format!("{:?} {p:.3}", model.tokenizer().decode(&[t])?)));
        Ok(tops.collect::<Result<Vec<_>>>()?.join(", "))
    };
    println!("top logits before: {}", show(&before)?);
    println!("top logits after:  {}", show(&after)?);
    Ok(())
}
