#!/usr/bin/env bash
# SHA-256 of the trained weights for every architecture and loss variant (with checkpoints written
# along the way). A refactor of the trainer must leave every line unchanged: run this before and
# after and diff the outputs. (Resume is bit-identical to a straight run by the sae crate's tests.)
#
#   SAEKIT_BIN=target/debug/saekit bash scripts/train-fingerprints.sh > before.txt
#   ... change the trainer, rebuild ...
#   SAEKIT_BIN=target/debug/saekit bash scripts/train-fingerprints.sh | diff before.txt -
#
# The data is a seeded sparse mixture (python3 + numpy), 8,192 rows of width 64, so that latents
# die, AuxK and the pre-activation loss engage, and ReLU takes both its dense and sparse paths.
set -euo pipefail
BIN=${SAEKIT_BIN:-target/debug/saekit}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python3 - "$WORK/acts.npy" <<'EOF'
import sys, numpy as np
rng = np.random.default_rng(7)
atoms = rng.standard_normal((512, 64)).astype(np.float32)
rows = 8192
codes = np.zeros((rows, 512), np.float32)
for r in range(rows):
    j = rng.choice(512, 6, replace=False, p=np.r_[np.full(64, 0.9 / 64), np.full(448, 0.1 / 448)])
    codes[r, j] = rng.exponential(1.0, 6)
x = codes @ atoms + 0.05 * rng.standard_normal((rows, 64)).astype(np.float32) + 0.3
np.save(sys.argv[1], x.astype(np.float32))
EOF

common='tokens = 8192
batch_size = 256
d_sae = 1024
k = 4
dead_tokens = 256
jumprelu_init_threshold = 0.4
log_every = 4
checkpoint_every = 10
norm_estimate_rows = 2048
seed = 3'
variants=(
  'topk|arch = "topk"'
  'topk-multi|arch = "topk"
multi_topk = true
b_dec_init = "geometric_median"'
  'batchtopk|arch = "batchtopk"'
  'jumprelu-step|arch = "jumprelu"
lr = 1e-3
pre_act_loss_coefficient = 3e-3
jumprelu_ste_to_input = true'
  'jumprelu-tanh|arch = "jumprelu"
lr = 1e-3
jumprelu_sparsity_loss_mode = "tanh"'
  'jumprelu-quadratic|arch = "jumprelu"
lr = 1e-3
jumprelu_sparsity_loss_mode = "quadratic"
target_l0 = 10.0'
  'relu-dense|arch = "relu"
lr = 1e-3
relu_sparse_below = 0.0
grad_clip = 0.5'
  'relu-sparse|arch = "relu"
lr = 1e-3
l1_coefficient = 20.0
relu_sparse_below = 1.0
b_dec_init = "zeros"'
)
for v in "${variants[@]}"; do
  name=${v%%|*}
  printf '%s\n%s\nacts = "%s"\n' "$common" "${v#*|}" "$WORK/acts.npy" > "$WORK/$name.toml"
  "$BIN" train --config "$WORK/$name.toml" --out "$WORK/$name" >/dev/null 2>&1
  for f in sae_weights.safetensors sparsity.safetensors; do
    printf '%-20s %-24s %s\n' "$name" "$f" "$(sha256sum < "$WORK/$name/$f" | cut -c1-16)"
  done
done
