"""GGUF copies of the Qwen2, Qwen3, Phi-3, Pythia (GPT-NeoX) and Gemma 2/3 parity fixtures, named and laid out as llama.cpp's converter
(convert_hf_to_gguf.py) writes them: tensor names from llama.cpp's own gguf-py mapping
(gguf.get_tensor_name_map, the table the converter uses), Q/K rows kept as stored (llama.cpp runs these
architectures with the NEOX rotary and permutes only Llama's), tied embeddings without output.weight, the
metadata keys gguf.GGUFWriter writes for them, and the BPE vocabulary as the converter's get_vocab_base
lists it. crates/model/tests/archs.rs loads them and checks the forward pass against transformers' numbers.

Usage: scripts/make_gguf_fixtures.sh (needs PyPI only: gguf, numpy, safetensors)."""
import json
import os
import sys

import gguf
import numpy as np
from safetensors.numpy import load_file

ARCHS = {
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
    "phi3": gguf.MODEL_ARCH.PHI3,
    "pythia": gguf.MODEL_ARCH.GPTNEOX,
    "gemma2": gguf.MODEL_ARCH.GEMMA2,
    "gemma3": gguf.MODEL_ARCH.GEMMA3,
}
GEMMA = (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3)


def vocab(tok, n_vocab):
    """Tokens by id with their types, as convert_hf_to_gguf.py's get_vocab_base builds them."""
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for t, i in tok["model"]["vocab"].items():
        tokens[i], types[i] = t, gguf.TokenType.NORMAL
    for a in tok.get("added_tokens", []):
        tokens[a["id"]] = a["content"]
        types[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    return tokens, types, merges


def gemma_parameters(w, arch, cfg, head_dim):
    """Gemma2Model / Gemma3Model.set_gguf_parameters. llama.cpp records no layer pattern (2 for Gemma 2,
    6 for Gemma 3), no local rope base (10000) and no query_pre_attn_scalar: it takes head_dim, or
    d_model / heads for the 27B models, which is what every released Gemma's config says."""
    w.add_head_count_kv(cfg.get("num_key_value_heads", cfg["num_attention_heads"]))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_sliding_window(cfg["sliding_window"])
    if arch == gguf.MODEL_ARCH.GEMMA2:
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        # this tiny fixture's query_pre_attn_scalar (24) is neither rule's, so it is written as llama.cpp's
        # attention.scale key, which saekit reads before the rule
        w.add_attention_scale(cfg["query_pre_attn_scalar"] ** -0.5)
    else:
        full = cfg["rope_parameters"]["full_attention"]
        w.add_rope_freq_base(full["rope_theta"])
        if full.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(full["factor"])
        if cfg.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(cfg["final_logit_softcapping"])


def neox_qkv_to_blocks(t, heads):
    """GPTNeoXModel.modify_tensors: the fused QKV rows from per-head [q, k, v] triples (transformers'
    layout) to all of q, then all of k, then all of v."""
    per_head = t.reshape((heads, 3, -1) + t.shape[1:])
    return np.concatenate([per_head[:, i].reshape((-1,) + t.shape[1:]) for i in range(3)], axis=0)


def build(name, root):
    arch = ARCHS[name]
    d = os.path.join(root, name)
    cfg = json.load(open(os.path.join(d, "config.json")))
    tok = json.load(open(os.path.join(d, "tokenizer.json")))
    n_layers, hidden, heads = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    w = gguf.GGUFWriter(os.path.join(d, "model.gguf"), gguf.MODEL_ARCH_NAMES[arch])
    w.add_name(name)
    w.add_block_count(n_layers)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    if arch in GEMMA:
        gemma_parameters(w, arch, cfg, head_dim)
    elif arch == gguf.MODEL_ARCH.GPTNEOX:
        # GPTNeoXModel.set_gguf_parameters: LayerNorm eps, the rotating share of each head, parallel
        # residual; no rope base (llama.cpp's default, 10000, is Pythia's)
        w.add_layer_norm_eps(cfg["layer_norm_eps"])
        w.add_rope_dimension_count(int(cfg["rope_parameters"]["partial_rotary_factor"] * head_dim))
        w.add_parallel_residual(cfg.get("use_parallel_residual", True))
    else:
        w.add_head_count_kv(cfg.get("num_key_value_heads", heads))
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
        w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
        w.add_rope_dimension_count(head_dim)
    if name == "qwen3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens, types, merges = vocab(tok, cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eos = cfg["eos_token_id"]
    w.add_eos_token_id(eos[0] if isinstance(eos, list) else eos)
    if cfg.get("bos_token_id") is not None:
        w.add_bos_token_id(cfg["bos_token_id"])
    tok_cfg = json.load(open(os.path.join(d, "tokenizer_config.json")))
    w.add_add_bos_token(bool(tok_cfg.get("add_bos_token", False)))  # as gguf.SpecialVocab reads it

    names = gguf.get_tensor_name_map(arch, n_layers)
    for hf_name, t in sorted(load_file(os.path.join(d, "model.safetensors")).items()):
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            sys.exit(f"{name}: llama.cpp's map has no name for {hf_name}")
        if arch == gguf.MODEL_ARCH.GPTNEOX and ".query_key_value." in hf_name:
            t = neox_qkv_to_blocks(t, heads)
        if arch in GEMMA and hf_name.endswith("norm.weight"):
            t = t + 1  # Gemma{2,3}Model.modify_tensors: GGUF stores the RMSNorm gain itself, 1 + w

        w.add_tensor(gguf_name, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{name}: model.gguf written (gguf-py {getattr(gguf, '__version__', '?')})")


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures"
    for name in sys.argv[2:] or list(ARCHS):
        build(name, root)


if __name__ == "__main__":
    main()
