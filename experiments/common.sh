# Shared settings of the experiment scripts. Sized for a 2-core CPU by default;
# FULL=1 gives the study's settings (50 epochs x 20 runs x 200 steps; 1000-step meta-tests).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-python}
DATA_ROOT=${DATA_ROOT:-data/}
FULL=${FULL:-0}
if [[ -n ${MAX_STEPS:-} ]]; then      # equal meta-steps per run, whatever the machine's load
  TRAIN_BUDGET=(--trainer.max_steps "$MAX_STEPS")
  EVAL_STEPS=${EVAL_STEPS:-1000}; EVAL_SEEDS=${EVAL_SEEDS:-3}
elif [[ $FULL == 1 ]]; then
  TRAIN_BUDGET=()                      # the config's max_epochs (50)
  EVAL_STEPS=1000; EVAL_SEEDS=3
else
  TRAIN_BUDGET=(--trainer.max_time "$(printf "00:%02d:%02d:00" $((${TRAIN_MINUTES:-45} / 60)) $((${TRAIN_MINUTES:-45} % 60)))")
  EVAL_STEPS=${EVAL_STEPS:-1000}; EVAL_SEEDS=${EVAL_SEEDS:-3}
fi
train() {  # train CONFIG [more args]: meta-train a new run (to continue a killed one, run the same
           # train.py command with --ckpt_path last and a budget that is not used up)
  $PY train.py fit --config "$@" --data.root "$DATA_ROOT" "${TRAIN_BUDGET[@]}"
}
checkpoint() { $PY -m l2o.checkpoints "$1" "${2:-best}"; }
