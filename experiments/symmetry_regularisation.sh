#!/usr/bin/env bash
# Symmetry-breaking regularisation: meta-train with beta in {0, 0.1, 0.5, 1} on one optimizee
# (leaky_relu: rescale constraint, the default; batchnorm_relu: scale), each for the same
# budget (TRAIN_MINUTES, default 10 here; FULL=1: 50 epochs; MAX_STEPS=N: N meta-steps each),
# then meta-test them together. PARALLEL=1 meta-trains the four at once (one thread each), so a
# shared machine's load falls on all of them alike.
#   bash experiments/symmetry_regularisation.sh [leaky_relu|batchnorm_relu]
#   MAX_STEPS=2000 PARALLEL=1 bash experiments/symmetry_regularisation.sh leaky_relu
# About 4 x TRAIN_MINUTES + 5 min on a 2-core CPU. Results: runs/eval/<optimizee>_beta/.
TRAIN_MINUTES=${TRAIN_MINUTES:-10}
source "$(dirname "$0")/common.sh"
OPTIMIZEE=${1:-leaky_relu}
entries=()
mkdir -p runs
for beta in 0 0.1 0.5 1; do
  if [[ ${PARALLEL:-0} == 1 ]]; then
    train "configs/$OPTIMIZEE.yaml" --config "configs/symmetry/${OPTIMIZEE}_beta${beta}.yaml" \
      > "runs/${OPTIMIZEE}_beta$beta.train.log" 2>&1 &
  else
    train "configs/$OPTIMIZEE.yaml" --config "configs/symmetry/${OPTIMIZEE}_beta${beta}.yaml"
  fi
done
wait  # a failed background run fails the script through the missing checkpoint below
for beta in 0 0.1 0.5 1; do
  entries+=("{name: l2o, label: beta_$beta, checkpoint: $(checkpoint "runs/${OPTIMIZEE}_beta$beta")}")
done
list=$(IFS=,; echo "${entries[*]}")
$PY evaluate.py --config "configs/eval_$OPTIMIZEE.yaml" --data.init_args.root "$DATA_ROOT" \
  --optimizers "[{name: adam, lr: tune}, {name: sgd, lr: tune, momentum: 0.9}, $list]" \
  --steps "${BETA_EVAL_STEPS:-200}" --seeds "$EVAL_SEEDS" --tail_index_every 0 \
  --covariance_every 0 --name "${OPTIMIZEE}_beta"
