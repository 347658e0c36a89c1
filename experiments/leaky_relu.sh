#!/usr/bin/env bash
# The study's Leaky ReLU experiment: meta-train (45 min on a 2-core CPU; FULL=1: 50 epochs),
# then meta-test the best checkpoint beside tuned SGD, Adam and Lion with every analysis
# (about 10 min on a 2-core CPU). Results: runs/eval/leaky_relu/.
source "$(dirname "$0")/common.sh"
train configs/leaky_relu.yaml
$PY evaluate.py --config configs/eval_leaky_relu.yaml --data.init_args.root "$DATA_ROOT" \
  --checkpoints "[$(checkpoint runs/leaky_relu)]" --steps "$EVAL_STEPS" --seeds "$EVAL_SEEDS"
