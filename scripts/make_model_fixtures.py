"""Build the parity fixtures for Gemma 2, Gemma 3 (text), GPT-NeoX/Pythia, Qwen2, Qwen3, Phi-3 and Llama
(SmolLM2-135M's config).

For each architecture: the real model's config (values copied from the published config.json) shrunk in
size, random weights made by transformers itself, a small byte-level BPE tokenizer with the model's special
tokens and chat template, and what transformers computes on a fixed prompt: token ids, every TransformerLens
hook point, logits, a greedy generation and the chat template's rendering. saekit's forward must reproduce
them (crates/model/tests/archs.rs). The Gemma 2 folder also gets a Gemma-Scope-shaped `params.npz`
(JumpReLU, thresholds) for the SAE commands.

    bash scripts/make_model_fixtures.sh            # makes a venv with CPU torch + transformers, then runs this
    python scripts/make_model_fixtures.py tests/fixtures [ARCH...]
"""
import json
import os
import sys

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

PROMPT = ("The quick brown fox jumps over the lazy dog while sparse autoencoders read the residual stream, "
          "and def add(a, b): return a + b.")
CHAT = [{"role": "user", "content": "Which feature fires on French text?"}]
N_GENERATE = 12

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Sparse autoencoders decompose the residual stream of a language model into features.",
    "def add(a, b):\n    return a + b\n",
    "Le renard brun saute par-dessus le chien paresseux. 12345 67890",
    "Which feature fires on French text? The model answers in the chat.",
]

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")

# Each entry: the published config.json of the named model with the size fields shrunk (everything else as
# published), the tokenizer's special tokens, and how the forward is hooked (see hook_modules).
ARCHS = {
    "gemma2": dict(
        real="google/gemma-2-2b",
        config=dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], hidden_size=64,
                    intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, query_pre_attn_scalar=24, sliding_window=8, attn_logit_softcapping=50.0,
                    final_logit_softcapping=30.0, rms_norm_eps=1e-6, rope_theta=10000.0,
                    max_position_embeddings=256, hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh",
                    tie_word_embeddings=True, attention_bias=False, pad_token_id=0, eos_token_id=1,
                    bos_token_id=2, torch_dtype="float32"),
        specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        bos="<bos>", eos="<eos>", add_bos=True, template=GEMMA_TEMPLATE, family="gemma",
        # Layer 0's q/k weights large enough that its attention scores pass the 50 cap, the final norm gain
        # large enough that logits pass the 30 cap (only layer 0, so f32 rounding is not amplified downstream).
        scale={"layers.0.self_attn.q_proj": 12.0, "layers.0.self_attn.k_proj": 12.0},
        shift={"model.norm.weight": 40.0}, sae=True),
    "gemma3": dict(
        real="google/gemma-3-1b-pt (rope_scaling from gemma-3-4b)",
        config=dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], hidden_size=64,
                    intermediate_size=128, num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=1,
                    head_dim=16, query_pre_attn_scalar=16, sliding_window=8, sliding_window_pattern=6,
                    rope_theta=1000000.0, rope_local_base_freq=10000.0,
                    rope_scaling={"rope_type": "linear", "factor": 8.0}, rms_norm_eps=1e-6,
                    max_position_embeddings=256, hidden_activation="gelu_pytorch_tanh",
                    attn_logit_softcapping=None, final_logit_softcapping=None, tie_word_embeddings=True,
                    attention_bias=False, pad_token_id=0, eos_token_id=1, bos_token_id=2, torch_dtype="float32"),
        specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        bos="<bos>", eos="<eos>", add_bos=True, template=GEMMA_TEMPLATE, family="gemma",
        scale={}, sae=False),
    "pythia": dict(
        real="EleutherAI/pythia-70m-deduped",
        config=dict(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"], hidden_size=64,
                    intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, rotary_pct=0.25,
                    rotary_emb_base=10000, max_position_embeddings=256, layer_norm_eps=1e-5, hidden_act="gelu",
                    use_parallel_residual=True, tie_word_embeddings=False, attention_bias=True,
                    bos_token_id=0, eos_token_id=0, torch_dtype="float32"),
        specials=["<|endoftext|>", "<|padding|>"],
        bos="<|endoftext|>", eos="<|endoftext|>", add_bos=False, template=None, family="neox",
        scale={}, sae=False),
    "qwen3": dict(
        real="Qwen/Qwen3-0.6B",
        config=dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=64, intermediate_size=128,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                    rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=256, hidden_act="silu",
                    tie_word_embeddings=True, attention_bias=False, use_sliding_window=False, sliding_window=None,
                    bos_token_id=0, eos_token_id=1, torch_dtype="float32"),
        specials=["<|endoftext|>", "<|im_end|>", "<|im_start|>"],
        bos=None, eos="<|im_end|>", add_bos=False, template=CHATML_TEMPLATE, family="llama",
        scale={"embed_tokens": 4.0}, sae=False),
    "qwen2": dict(
        real="Qwen/Qwen2.5-0.5B-Instruct",
        config=dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=64, intermediate_size=128,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                    rope_theta=1000000.0, max_position_embeddings=256, hidden_act="silu",
                    tie_word_embeddings=True, use_sliding_window=False, sliding_window=None,
                    bos_token_id=0, eos_token_id=1, torch_dtype="float32"),
        specials=["<|endoftext|>", "<|im_end|>", "<|im_start|>"],
        bos=None, eos="<|im_end|>", add_bos=False, template=CHATML_TEMPLATE, family="llama",
        # the q/k/v biases (Qwen2's) are jittered like every 1-D parameter: a loader dropping them fails
        scale={"embed_tokens": 4.0}, sae=False),
    "phi3": dict(
        real="microsoft/Phi-3-mini-4k-instruct",
        config=dict(model_type="phi3", architectures=["Phi3ForCausalLM"], hidden_size=64, intermediate_size=128,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5,
                    rope_theta=10000.0, rope_scaling=None, max_position_embeddings=256,
                    original_max_position_embeddings=256, sliding_window=None, hidden_act="silu",
                    tie_word_embeddings=False, attention_bias=False, bos_token_id=1, eos_token_id=3,
                    pad_token_id=2, torch_dtype="float32"),
        specials=["<unk>", "<s>", "<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"],
        bos="<s>", eos="<|end|>", add_bos=False, template=PHI3_TEMPLATE, family="llama",
        scale={}, sae=False),
    "llama": dict(
        real="HuggingFaceTB/SmolLM2-135M-Instruct",
        config=dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                    rope_theta=100000, rope_scaling=None, max_position_embeddings=256, hidden_act="silu",
                    tie_word_embeddings=True, attention_bias=False, mlp_bias=False, pretraining_tp=1,
                    bos_token_id=1, eos_token_id=2, pad_token_id=2, torch_dtype="float32"),
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos="<|im_start|>", eos="<|im_end|>", add_bos=False, template=CHATML_TEMPLATE, family="llama",
        scale={}, sae=False),
}


def make_tokenizer(spec, out):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=spec["specials"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if spec["add_bos"]:
        bos = spec["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    path = os.path.join(out, "tokenizer.json")
    tok.save(path)
    kw = dict(tokenizer_file=path, eos_token=spec["eos"])
    if spec["bos"]:
        kw["bos_token"] = spec["bos"]
    if spec["family"] == "gemma":
        kw.update(pad_token="<pad>", unk_token="<unk>")
    hf_tok = PreTrainedTokenizerFast(**kw)
    if spec["template"]:
        hf_tok.chat_template = spec["template"]
    hf_tok.save_pretrained(out)
    # The published tokenizer_config.json states add_bos_token; transformers does not always write it back.
    cfg_path = os.path.join(out, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg["add_bos_token"] = spec["add_bos"]
    if spec["template"] and "chat_template" not in cfg and not os.path.exists(os.path.join(out, "chat_template.jinja")):
        cfg["chat_template"] = spec["template"]
    json.dump(cfg, open(cfg_path, "w"), indent=1)
    return PreTrainedTokenizerFast.from_pretrained(out), tok.get_vocab_size()


def hook_modules(model, family):
    """Per layer: (module whose output is hook_attn_out, module whose input is hook_resid_mid or None,
    module whose output is hook_mlp_out), following TransformerLens (Gemma's post-norms sit before the hook)."""
    if family == "neox":
        return [(l.attention.dense, None, l.mlp) for l in model.gpt_neox.layers], model.gpt_neox.final_layer_norm
    if family == "gemma":
        layers = model.model.layers
        return [(l.post_attention_layernorm, l.pre_feedforward_layernorm, l.post_feedforward_layernorm)
                for l in layers], model.model.norm
    layers = model.model.layers
    return [(l.self_attn.o_proj, l.post_attention_layernorm, l.mlp) for l in layers], model.model.norm


def inner_modules(layer, family):
    """Per layer, the modules around TransformerLens's ln1/ln2/mlp hook points: (module whose output is
    ln1.hook_normalized, module whose output is ln2.hook_normalized, module whose output holds mlp.hook_pre
    in its first d_mlp columns, module whose input is mlp.hook_post)."""
    if family == "neox":
        return (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp.dense_h_to_4h,
                layer.mlp.dense_4h_to_h)
    ln2 = layer.pre_feedforward_layernorm if family == "gemma" else layer.post_attention_layernorm
    # Phi-3 fuses gate and up into gate_up_proj, gate first
    pre = layer.mlp.gate_up_proj if hasattr(layer.mlp, "gate_up_proj") else layer.mlp.gate_proj
    return layer.input_layernorm, ln2, pre, layer.mlp.down_proj


def first(x):
    return x[0] if isinstance(x, tuple) else x


def capture(model, family, ids):
    """Every TransformerLens hook point of one forward pass, plus the logits."""
    acts, handles = {}, []
    per_layer, final_norm = hook_modules(model, family)
    layers = model.gpt_neox.layers if family == "neox" else model.model.layers

    def out_hook(name):
        return lambda _m, _i, o: acts.__setitem__(name, first(o)[0].detach().clone())

    def in_hook(name):
        def f(_m, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            acts[name] = x[0].detach().clone()
        return f

    def pre_hook(name, d_mlp):
        return lambda _m, _i, o: acts.__setitem__(name, first(o)[0, :, :d_mlp].detach().clone())

    d_mlp = model.config.intermediate_size
    for l, layer in enumerate(layers):
        ln1, ln2, pre, down = inner_modules(layer, family)
        handles.append(ln1.register_forward_hook(out_hook(f"blocks.{l}.ln1.hook_normalized")))
        handles.append(ln2.register_forward_hook(out_hook(f"blocks.{l}.ln2.hook_normalized")))
        handles.append(pre.register_forward_hook(pre_hook(f"blocks.{l}.mlp.hook_pre", d_mlp)))
        handles.append(down.register_forward_pre_hook(in_hook(f"blocks.{l}.mlp.hook_post"), with_kwargs=True))
    for l, (attn, mid, mlp) in enumerate(per_layer):
        handles.append(layers[l].register_forward_pre_hook(in_hook(f"blocks.{l}.hook_resid_pre"), with_kwargs=True))
        handles.append(layers[l].register_forward_hook(out_hook(f"blocks.{l}.hook_resid_post")))
        handles.append(attn.register_forward_hook(out_hook(f"blocks.{l}.hook_attn_out")))
        handles.append(mlp.register_forward_hook(out_hook(f"blocks.{l}.hook_mlp_out")))
        if mid is not None:
            handles.append(mid.register_forward_pre_hook(in_hook(f"blocks.{l}.hook_resid_mid"), with_kwargs=True))
    handles.append(final_norm.register_forward_hook(out_hook("ln_final.hook_normalized")))
    with torch.no_grad():
        o = model(torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    for h in handles:
        h.remove()
    acts["hook_embed"] = o.hidden_states[0][0]
    return {k: v.float().numpy() for k, v in acts.items()}, o.logits[0].float().numpy()


def scale_weights(model, scale, shift):
    """Norm gains and biases start at 0 or 1 in transformers' init, which would hide a wrong (1 + w) or a
    dropped bias: jitter every 1-D parameter. Then scale the named weights up."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
            else:  # larger than the default init so every layer matters (as in the GPT-2 fixture)
                p.mul_(3.0)
        for name, p in model.named_parameters():
            for key, f in scale.items():
                if key in name:
                    p.mul_(f)
            if name in shift:
                p.add_(shift[name])


def softcap_evidence(model, acts, cfg):
    """How far the pre-cap values go past Gemma 2's caps, so the fixture is known to exercise the clipping."""
    unembed = model.get_output_embeddings().weight
    raw_logits = torch.tensor(acts["ln_final.hook_normalized"]) @ unembed.detach().T
    attn = model.model.layers[0].self_attn
    x = model.model.layers[0].input_layernorm(torch.tensor(acts["blocks.0.hook_resid_pre"]))
    q = attn.q_proj(x).view(-1, cfg.num_attention_heads, cfg.head_dim)
    k = attn.k_proj(x).view(-1, cfg.num_key_value_heads, cfg.head_dim)
    k = k.repeat_interleave(cfg.num_attention_heads // cfg.num_key_value_heads, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * cfg.query_pre_attn_scalar ** -0.5
    return {"max_abs_raw_final_logit": float(raw_logits.abs().max()),
            "final_logit_softcapping": cfg.final_logit_softcapping,
            "max_abs_layer0_attn_score_before_rope": float(scores.abs().max()),
            "attn_logit_softcapping": cfg.attn_logit_softcapping}


def make_gemma_scope_npz(out, d_model, seed=1):
    """A JumpReLU SAE in Gemma Scope's params.npz layout (W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc,
    b_dec, threshold), for blocks.1.hook_resid_post. W_enc is saved as numpy lays out `W_dec.T`
    (Fortran order), as a transposed matrix often is. On the fixture's prompt about 90 of the 256
    features fire per token and the thresholds cut about 35 more positive pre-activations per token, so
    a loader that ignored them would be caught (crates/cli/tests/gemma_scope.rs)."""
    g = np.random.default_rng(seed)
    d_sae = 4 * d_model
    w_dec = g.standard_normal((d_sae, d_model)).astype(np.float32)
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    w_enc = (w_dec.T * 0.5).astype(np.float32)
    b_enc = (g.standard_normal(d_sae) * 0.1).astype(np.float32)
    b_dec = (g.standard_normal(d_model) * 0.05).astype(np.float32)
    threshold = np.abs(g.standard_normal(d_sae)).astype(np.float32) * 0.5
    os.makedirs(os.path.join(out, "gemma-scope-res-L1"), exist_ok=True)
    np.savez(os.path.join(out, "gemma-scope-res-L1", "params.npz"), W_enc=w_enc, W_dec=w_dec, b_enc=b_enc,
             b_dec=b_dec, threshold=threshold)


def build(name, spec, root):
    out = os.path.join(root, name)
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    hf_tok, vocab = make_tokenizer(spec, out)
    cfg_dict = dict(spec["config"], vocab_size=vocab)
    model_type = cfg_dict.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **cfg_dict)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", torch_dtype=torch.float32).eval()
    scale_weights(model, spec["scale"], spec.get("shift", {}))
    model.generation_config.eos_token_id = None  # generate exactly N_GENERATE tokens, as saekit is asked to
    model.generation_config.pad_token_id = cfg_dict.get("pad_token_id", 0)
    model.save_pretrained(out, safe_serialization=True)

    ids = hf_tok(PROMPT)["input_ids"]
    acts, logits = capture(model, spec["family"], ids)
    np.save(os.path.join(out, "ref_token_ids.npy"), np.array(ids, dtype=np.int64))
    np.savez(os.path.join(out, "ref_hooks.npz"), **acts)
    np.save(os.path.join(out, "ref_logits.npy"), logits)
    with torch.no_grad():
        gen = model.generate(torch.tensor([ids]), max_new_tokens=N_GENERATE, min_new_tokens=N_GENERATE,
                             do_sample=False)
    meta = {"text": PROMPT, "real_config": spec["real"], "n_layers": cfg.num_hidden_layers,
            "generated_ids": gen[0, len(ids):].tolist(), "hook_points": sorted(acts),
            "torch": torch.__version__, "transformers": transformers.__version__}
    if spec["template"]:
        chat = hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
        meta.update(chat_messages=CHAT, chat_text=chat,
                    chat_ids=hf_tok(chat, add_special_tokens=False)["input_ids"])
    if name == "gemma2":
        meta["softcap"] = softcap_evidence(model, acts, cfg)
        meta["sliding_window"] = cfg.sliding_window
        assert len(ids) > cfg.sliding_window, "the prompt must be longer than the sliding window"
        assert meta["softcap"]["max_abs_raw_final_logit"] > 1.5 * cfg.final_logit_softcapping, meta["softcap"]
        assert meta["softcap"]["max_abs_layer0_attn_score_before_rope"] > 1.5 * cfg.attn_logit_softcapping
    if spec["sae"]:
        make_gemma_scope_npz(out, cfg.hidden_size)
    json.dump(meta, open(os.path.join(out, "ref_meta.json"), "w"), indent=1)
    print(f"{name}: {len(ids)} tokens, {len(acts)} hook points, generated {meta['generated_ids']}")


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures"
    names = sys.argv[2:] or list(ARCHS)
    for name in names:
        build(name, ARCHS[name], root)


if __name__ == "__main__":
    main()
