#!/usr/bin/env bash
# MEND on SmolLM2-135M / CounterFact: several settings trained side by side on one GPU, each for a
# fixed wall-clock budget, then each tested (200 records of counterfact-val.json, single edits) with
# the checkpoint of its highest val/edit_score (harmonic mean of validation reliability,
# generalization and locality; records 200-299, disjoint from the test records).
#
#   bash experiments/mend_counterfact_gpu.sh                 # 4 settings x 5 minutes, then tests
#   TRAIN_SECONDS=1800 bash experiments/mend_counterfact_gpu.sh
#   ONLY=both_cloc20 SCHEDULE=cosine MAX_STEPS=2000 TRAIN_SECONDS=3600 bash experiments/mend_counterfact_gpu.sh
#
# SCHEDULE=cosine decays every learning rate to a tenth at MAX_STEPS (fit.module.lr_schedule), so
# MAX_STEPS, not TRAIN_SECONDS, should end those runs; on the CPU it moved the editor outward once the
# lr fell below about 4e-6 (docs/results/mend_counterfact.md, "Run 1 of the chain").
#
# Each optimizer step trains BATCH single edits, edited independently in one batched pass
# (method.batch_edits=independent: the same objective as BATCH accumulated batches of one edit, as
# EasyEdit trains MEND, at a fraction of the kernel launches).  BATCH=1 ACCUMULATE=10 BATCH_EDITS=joint
# is the one-edit-per-batch setting of the earlier runs.
#
# A small model leaves one GPU mostly idle (every kernel is tiny), so several processes share it.
# Run folders: experiments/runs/mend_smollm2_counterfact_gpu_<setting>/<date>/ (summary.json,
# training_curves.csv, train.log); stdout of each run: $LOG_DIR/<setting>.log.
set -uo pipefail
cd "$(dirname "$0")/.."

TRAIN_SECONDS=${TRAIN_SECONDS:-300}   # wall-clock training budget of each setting (Lightning max_time)
BATCH=${BATCH:-10}                   # records per training batch
ACCUMULATE=${ACCUMULATE:-1}          # training batches per optimizer step
BATCH_EDITS=${BATCH_EDITS:-independent}
VAL_EVERY=${VAL_EVERY:-200}          # training batches between validations (100 records each)
LOG_DIR=${LOG_DIR:-experiments/runs/mend_counterfact_gpu_logs}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-"trainer=gpu model.device=cuda"}
EXTRA=${EXTRA:-}                     # more overrides for every setting (e.g. data.test.limit=20)
SCHEDULE=${SCHEDULE:-constant}       # constant | cosine (fit.module.lr_schedule)
MAX_STEPS=${MAX_STEPS:-100000}       # optimizer steps; cosine reaches its floor here
ONLY=${ONLY:-}                       # space-separated setting names to run (default: all)
if [[ "$SCHEDULE" == cosine && "$MAX_STEPS" == 100000 ]]; then
  echo "SCHEDULE=cosine needs MAX_STEPS (the step where the learning rate reaches its floor)" >&2
  exit 2
fi
mkdir -p "$LOG_DIR"

# name: overrides (edit loss on the rephrase and the literal prompt, locality weight, learning rates)
declare -A SETTINGS=(
  [both_cloc10]="method.edit_outer=both method.c_loc=10 fit.module.lr=1e-5"
  [both_cloc15]="method.edit_outer=both method.c_loc=15 fit.module.lr=1e-5"
  [both_cloc20]="method.edit_outer=both method.c_loc=20 fit.module.lr=1e-5"
  [both_cloc15_lr3e-5_lrlr1e-5]="method.edit_outer=both method.c_loc=15 fit.module.lr=3e-5 method.lr_lr=1e-5"
)
max_time=$(printf "00:%02d:%02d:%02d" $((TRAIN_SECONDS / 3600)) $((TRAIN_SECONDS % 3600 / 60)) $((TRAIN_SECONDS % 60)))

names=(${ONLY:-${!SETTINGS[@]}})
for name in "${names[@]}"; do
  if [[ -z "${SETTINGS[$name]+set}" ]]; then
    echo "unknown setting '$name' in ONLY; settings: ${!SETTINGS[*]}" >&2
    exit 2
  fi
done

# Convert the packaged model once before the processes start (they would wait on its lock anyway).
"$PYTHON" -c "from editlab.models.packaged import SMOLLM2_135M, ensure_converted; ensure_converted(SMOLLM2_135M)"

pids=()
for name in "${names[@]}"; do
  # shellcheck disable=SC2086  # the overrides are words
  OMP_NUM_THREADS=2 "$PYTHON" -m editlab.train experiment=mend_smollm2_counterfact \
    experiment_name="mend_smollm2_counterfact_gpu_${name}" ${SETTINGS[$name]} \
    data.train_batch_size="$BATCH" fit.trainer.accumulate_grad_batches="$ACCUMULATE" \
    method.batch_edits="$BATCH_EDITS" fit.trainer.max_steps="$MAX_STEPS" \
    fit.module.lr_schedule="$SCHEDULE" \
    $DEVICE $EXTRA \
    "+fit.trainer.max_time=\"$max_time\"" fit.trainer.val_check_interval="$VAL_EVERY" \
    fit.callbacks.checkpoint.monitor=val/edit_score fit.callbacks.checkpoint.mode=max \
    >"$LOG_DIR/${name}.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done
exit $status
