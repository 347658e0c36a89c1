#!/usr/bin/env bash
# The study's BatchNorm-ReLU experiment: meta-train (45 min on a 2-core CPU; FULL=1: 50 epochs),
# then meta-test the best checkpoint beside tuned SGD, Adam and Lion with every analysis
# (about 10 min on a 2-core CPU). Results: runs/eval/batchnorm_relu/.
source "$(dirname "$0")/common.sh"
train configs/batchnorm_relu.yaml
$PY evaluate.py --config configs/eval_batchnorm_relu.yaml --data.init_args.root "$DATA_ROOT" \
  --checkpoints "[$(checkpoint runs/batchnorm_relu)]" --steps "$EVAL_STEPS" --seeds "$EVAL_SEEDS"
