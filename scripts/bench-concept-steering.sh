#!/usr/bin/env bash
# Does the feature concept search ranks first steer toward its concept more often than the tenth? For
# every concept of a `saekit demo` folder, once in AUROC order (how `saekit search --pos/--neg` lists
# features) and once in steering order (`saekit search --steer 32`: the 32 best by AUROC reordered by how
# far clamping each raises the concept's tokens on four probe prompts), the 1st and 10th feature are
# clamped at 3x their max activation while the model answers 16 other chat prompts (greedy, 32 tokens),
# and a character n-gram detector trained on the corpus judges each answer. JSON lines, then a summary per
# order.
#   bash scripts/bench-concept-steering.sh saekit-demo     # after `bash scripts/demo.sh --no-serve`
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEMO=${1:?usage: bench-concept-steering.sh DEMO_DIR}
(cd "$ROOT" && cargo build --release --locked -p saekit)
BIN=$ROOT/target/release/saekit
echo "== $(date -u) $(grep -m1 'model name' /proc/cpuinfo) $(uptime)"
for ORDER in auroc steer; do
  "$BIN" bench concept-steering --sae "$DEMO/sae" --db "$DEMO/features.sqlite" --corpus "$DEMO/corpus" \
    --order $ORDER --ranks 1,10 --times 3 --prompts 16 --tokens 32
  echo "== $(date -u) $(uptime)"
done
