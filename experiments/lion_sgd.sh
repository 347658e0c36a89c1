#!/usr/bin/env bash
# Lion-SGD interpolation on the sigmoid optimizee: Lion, SGD, lion_weight in {0.1, 0.25, 0.5}.
# No meta-training needed. About 3 min on a 2-core CPU. Results: runs/eval/lion_sgd/.
#   FULL=1 also runs the study's 784-100-100-10 network.
source "$(dirname "$0")/common.sh"
$PY evaluate.py --config configs/eval_lion_sgd.yaml --data.init_args.root "$DATA_ROOT" \
  --steps "$EVAL_STEPS" --seeds "$EVAL_SEEDS"
if [[ $FULL == 1 ]]; then
  $PY evaluate.py --config configs/eval_lion_sgd.yaml --data.init_args.root "$DATA_ROOT" \
    --optimizee.sizes "[784, 100, 100, 10]" --name lion_sgd_784-100-100-10
fi
