"""Build the GPT-2 parity fixture: a small randomly initialised GPT-2 (transformers), its tokenizer, and its
hidden states on a fixed text, written to tests/fixtures/gpt2-tiny/. saekit's GPT-2 forward must reproduce them.

Run once with a Python that has torch + transformers + tokenizers (e.g. the venv of ../shared/bench/run_all.sh):
    python scripts/make_gpt2_fixture.py tests/fixtures/gpt2-tiny
"""
import json
import os
import sys

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel

out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/gpt2-tiny"
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)

# A byte-level BPE trained on a little text, so the fixture has a real tokenizer.json.
corpus = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Sparse autoencoders decompose the residual stream of a language model into features.",
    "def add(a, b):\n    return a + b\n",
    "Le renard brun saute par-dessus le chien paresseux. 12345 67890",
]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train_from_iterator(corpus, trainer)
tok.save(os.path.join(out, "tokenizer.json"))
json.dump({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "add_bos_token": False},
          open(os.path.join(out, "tokenizer_config.json"), "w"))

cfg = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=64, n_layer=3, n_head=4,
                 activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0,
                 attn_pdrop=0.0)
model = GPT2LMHeadModel(cfg).eval()
with torch.no_grad():  # larger than the default init so every layer matters
    for p in model.parameters():
        p.mul_(3.0)
model.save_pretrained(out, safe_serialization=True)

text = "The quick brown fox writes def add(a, b): return a + b in French: le renard."
ids = tok.encode(text).ids
with torch.no_grad():
    o = model(torch.tensor([ids]), output_hidden_states=True)
np.save(os.path.join(out, "ref_token_ids.npy"), np.array(ids, dtype=np.int64))
np.save(os.path.join(out, "ref_embed.npy"), o.hidden_states[0][0].numpy())
for layer in range(cfg.n_layer - 1):  # hidden_states[-1] has ln_f applied
    np.save(os.path.join(out, f"ref_resid_post_L{layer}.npy"), o.hidden_states[layer + 1][0].numpy())
np.save(os.path.join(out, "ref_logits.npy"), o.logits[0].numpy())
json.dump({"text": text, "n_layer": cfg.n_layer, "torch": torch.__version__,
           "transformers": __import__("transformers").__version__},
          open(os.path.join(out, "ref_meta.json"), "w"), indent=1)
print("wrote", out, "with", len(ids), "tokens")
