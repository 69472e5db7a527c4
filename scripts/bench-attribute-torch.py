"""PyTorch-autograd reference for `saekit attribute`: the same graph computed the way circuit-tracer computes it,
timed, and its edges compared with saekit's.

transformers' own Llama modules run the prompt with every attention pattern and every RMSNorm's 1/rms detached
(frozen), each MLP replaced by its transcoder's active features (leaf tensors holding saekit's feature
activations) plus b_dec, the skip connection and a frozen error term (a leaf), and the token embeddings a leaf.
As in circuit-tracer, the prompt is replicated once per target in a batch: one forward pass, then one backward
pass per batch of targets (copy j seeded with target j), with the graph retained. The nodes (features, errors,
tokens, logits) are those of saekit's full graph, read from its `<stem>.full.safetensors`, so both compute the
same adjacency matrix; this script prints its own time and peak memory and the largest difference from saekit's
edges, relative to each target's largest edge.

usage: python scripts/bench-attribute-torch.py MODEL.gguf TRANSCODERS_DIR GRAPH.full.safetensors [BATCH=32]
needs: torch, transformers, gguf, safetensors, numpy (a venv: see scripts/bench-gemma2-2b.sh)
"""
import os
import resource
import sys
import time

import numpy as np
import torch
import transformers.models.llama.modeling_llama as llama
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

# the fixture script's frozen modules and clean pass, so both references freeze the model the same way
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "attribution"))
from make import Replacement, clean_pass, frozen_attention, frozen_rms_norm  # noqa: E402


def load_transcoders(folder, n_layers):
    tcs = []
    for l in range(n_layers):
        t = load_file(os.path.join(folder, f"layer_{l}.safetensors"))
        tcs.append({k: torch.tensor(v, dtype=torch.float32) for k, v in t.items()})
    return tcs


def main():
    gguf, tc_dir, graph = sys.argv[1:4]
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 32
    torch.set_num_threads(os.cpu_count())
    g = load_file(graph)
    ids = torch.tensor(g["input_tokens"].astype(np.int64))[None]
    features = g["active_features"].astype(np.int64)  # [n_f, 3]: layer, position, feature
    values = torch.tensor(g["activation_values"].astype(np.float32))
    logit_tokens = torch.tensor(g["logit_tokens"].astype(np.int64))
    want = g["adjacency_matrix"]
    t_load = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(gguf)), gguf_file=os.path.basename(gguf), dtype=torch.float32,
        attn_implementation="eager").eval()
    cfg = model.config
    n_layers, seq, n_f, n_logits = cfg.num_hidden_layers, ids.shape[1], len(features), len(logit_tokens)
    tcs = load_transcoders(tc_dir, n_layers)
    t0 = time.perf_counter()
    print(f"model and transcoders loaded in {t0 - t_load:.1f} s", file=sys.stderr)

    ins, outs, _ = clean_pass(model, ids)

    # saekit's feature nodes, at its activations; every other feature is in the error term
    dense = [torch.zeros(seq, tcs[l]["W_enc"].shape[0]) for l in range(n_layers)]
    for (l, p, f), v in zip(features, values):
        dense[l][p, f] = v
    errors = []
    for l, t in enumerate(tcs):
        recon = dense[l] @ t["W_dec"] + t["b_dec"] + (ins[l] @ t["W_skip"].T if "W_skip" in t else 0)
        errors.append(outs[l] - recon)

    # the frozen replacement model, the prompt once per target of a batch
    llama.eager_attention_forward = frozen_attention
    llama.LlamaRMSNorm.forward = frozen_rms_norm
    acts = [a.expand(batch, -1, -1).clone().requires_grad_(True) for a in dense]
    errs = [e.expand(batch, -1, -1).clone().requires_grad_(True) for e in errors]
    pre_acts = []
    for l, layer in enumerate(model.model.layers):
        layer.mlp = Replacement(tcs[l], acts[l], errs[l], pre_acts)
    embed = model.model.embed_tokens(ids).detach().expand(batch, -1, -1).clone().requires_grad_(True)
    logits = model(inputs_embeds=embed).logits[:, -1]
    logit_targets = logits[:, logit_tokens] - logits.mean(-1, keepdim=True)  # [batch, n_logits]

    n = n_f + n_layers * seq + seq + n_logits
    adj = np.zeros((n, n), dtype=np.float32)
    fl, fp, ff = (torch.tensor(features[:, i]) for i in range(3))
    by_layer = [torch.nonzero(fl == l, as_tuple=True)[0] for l in range(n_layers)]
    targets = list(range(n_f)) + [n - n_logits + k for k in range(n_logits)]
    leaves = [embed] + acts + errs
    for lo in range(0, len(targets), batch):
        rows = targets[lo:lo + batch]
        seed = 0
        for j, row in enumerate(rows):
            if row < n_f:
                l, p, f = features[row]
                seed = seed + pre_acts[l][j, p, f]
            else:
                seed = seed + logit_targets[j, row - (n - n_logits)]
        grads = torch.autograd.grad(seed, leaves, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, leaves)]
        g_embed, g_acts, g_err = grads[0], grads[1:1 + n_layers], grads[1 + n_layers:]
        k = len(rows)
        block = np.zeros((k, n), dtype=np.float32)
        for l in range(n_layers):
            idx = by_layer[l]
            if len(idx):
                block[:, idx.numpy()] = (g_acts[l][:k, fp[idx], ff[idx]] * values[idx]).numpy()
            block[:, n_f + l * seq:n_f + (l + 1) * seq] = (g_err[l][:k] * errors[l]).sum(-1).numpy()
        block[:, n_f + n_layers * seq:n_f + n_layers * seq + seq] = (g_embed[:k] * embed[0].detach()).sum(-1).numpy()
        adj[rows] = block
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    rows = np.array(targets)
    scale = np.maximum(np.abs(want[rows]).max(1, keepdims=True), 1e-3)
    worst = float((np.abs(adj[rows] - want[rows]) / scale).max())
    print(f"torch {torch.__version__}: {seq} tokens, {n_f} feature nodes, {len(targets)} targets in batches of "
          f"{batch}: {wall:.1f} s, peak RSS {peak:.2f} GB (with the model); largest edge difference from saekit, "
          f"relative to its target's largest edge: {worst:.2e}")


if __name__ == "__main__":
    main()
