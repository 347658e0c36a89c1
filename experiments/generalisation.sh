#!/usr/bin/env bash
# Generalisation: the optimizer meta-trained on Leaky ReLU (run experiments/leaky_relu.sh first,
# or pass CHECKPOINT=path) meta-tested on optimizees it never saw, beside tuned Adam and SGD.
# About 2 min per optimizee on a 2-core CPU (GEN_STEPS=500, symmetry only).
# Results: runs/eval/generalisation_<optimizee>/.
source "$(dirname "$0")/common.sh"
CKPT=${CHECKPOINT:-$(checkpoint runs/leaky_relu)}
STEPS=${GEN_STEPS:-500}
[[ $FULL == 1 ]] && STEPS=1000
declare -A OPTIMIZEES=(
  [sigmoid]="{sizes: [784, 20, 10], activation: sigmoid}"
  [relu]="{sizes: [784, 20, 10], activation: relu}"
  [batchnorm_relu]="{sizes: [784, 20, 10], activation: relu, batchnorm: true}"
  [two_hidden]="{sizes: [784, 20, 20, 10], activation: leaky_relu}"
  [wide40]="{sizes: [784, 40, 10], activation: leaky_relu}"
)
for name in sigmoid relu batchnorm_relu two_hidden wide40; do
  $PY evaluate.py --data.root "$DATA_ROOT" --optimizee "${OPTIMIZEES[$name]}" \
    --optimizers "[{name: adam, lr: tune}, {name: sgd, lr: tune, momentum: 0.9}, {name: l2o, checkpoint: $CKPT}]" \
    --steps "$STEPS" --seeds "$EVAL_SEEDS" --tail_index_every 0 --covariance_every 0 \
    --histogram_every 0 --name "generalisation_$name"
done
