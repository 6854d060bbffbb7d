#!/usr/bin/env bash
# MALMEN and RLEdit on SmolLM2-135M / CounterFact on one GPU (issue 27's measurements): each editor
# trained by its experiment in its own process, side by side, for at most TRAIN_SECONDS; each
# experiment then tests the checkpoint its rule picks on the validation records (counterfact-val
# 200-299; lowest val/loss), once; then that same checkpoint is tested on a second set of records,
# disjoint from training, validation and the first test set.  Nothing here is chosen on test records.
#
#   bash experiments/trained_editors_gpu.sh                         # every setting, 8 minutes of training
#   TRAIN_SECONDS=1200 ONLY="malmen1000 rledit" bash experiments/trained_editors_gpu.sh
#   PYTHON=echo bash experiments/trained_editors_gpu.sh             # print the commands only
#
# Settings (test records of counterfact-val.json; "second" = the second, disjoint set):
#   malmen100   100 edits per training step, one epoch (the reference's n_epochs 1 = 100 steps);
#               test: one batch edit of records 300-399; second: 1300-1399
#   malmen500   500 per step (the reference trains one editor per batch size, data.n_edits);
#               test: one batch edit of 300-799; second: 1400-1899
#   malmen1000  1,000 per step; test: one batch edit of 300-1299 (issue 27's bar); no second set
#               (the file has 1,919 records)
#   rledit      episodes of 100 steps of 10 edits, 10 episodes (one epoch of counterfact-train);
#               test: a 1,000-edit stream of 300-1299 in batches of 10 with curves and final/;
#               second: a 500-edit stream of 1400-1899
#   alphaedit   no training: the rledit test stream (300-1299, batches of 10) with AlphaEdit, the
#               comparison issue 27 asks for; not in the default set (ONLY=alphaedit), because on a
#               fresh machine it first computes the key statistics of five blocks
# MALMEN_EPOCHS (default 1, the reference's) runs the MALMEN settings for more epochs: at 1,000 edits
# per step one epoch of counterfact-train is only 10 optimizer steps.  A run cut by TRAIN_SECONDS
# before its first validation tests the editor as training left it (its log says so) and gets no
# second test.
#
# Run folders: experiments/runs/<experiment>_gpu_<setting>/<date>/ and ..._gpu_<setting>_second/;
# stdout of each run: $LOG_DIR/<setting>.log and <setting>_second.log.  Results: the summary each
# log ends with; docs/results/malmen_counterfact.md and docs/results/lifelong.md for the CPU rows.
set -uo pipefail
cd "$(dirname "$0")/.."

TRAIN_SECONDS=${TRAIN_SECONDS:-480}  # wall-clock training budget of each setting (Lightning max_time)
MALMEN_EPOCHS=${MALMEN_EPOCHS:-1}
LOG_DIR=${LOG_DIR:-experiments/runs/trained_editors_gpu_logs}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-"trainer=gpu model.device=cuda"}
THREADS=${THREADS:-2}                # CPU threads per process
ONLY=${ONLY:-"malmen100 malmen500 malmen1000 rledit"}

MALMEN="experiment=malmen_smollm2_counterfact fit.trainer.max_epochs=$MALMEN_EPOCHS"
RLEDIT="experiment=rledit_smollm2_counterfact"
# name: the run (training and its test)
declare -A RUN=(
  [malmen100]="$MALMEN"
  [malmen500]="$MALMEN data.train_batch_size=500 data.batch_size=500 data.test.limit=500 fit.trainer.val_check_interval=5"
  [malmen1000]="$MALMEN data.train_batch_size=1000 data.batch_size=1000 data.test.limit=1000 fit.trainer.val_check_interval=5"
  [rledit]="$RLEDIT"
  [alphaedit]="experiment=alphaedit_smollm2_counterfact data.test.offset=300 stream.edits=1000 stream.batch_size=10 stream.eval_every=10"
)
# name: the second test of the checkpoint the run tested (ckpt_path added)
declare -A SECOND=(
  [malmen100]="experiment=malmen_smollm2_counterfact data.test.offset=1300 data.test.limit=100"
  [malmen500]="experiment=malmen_smollm2_counterfact data.batch_size=500 data.test.offset=1400 data.test.limit=500"
  [rledit]="$RLEDIT data.test.offset=1400 stream.edits=500"
)
TRAINS=(malmen100 malmen500 malmen1000 rledit)

for name in $ONLY; do
  if [[ -z "${RUN[$name]+set}" ]]; then
    echo "unknown setting '$name' in ONLY; settings: ${!RUN[*]}" >&2
    exit 2
  fi
done
max_time=$(printf "00:%02d:%02d:%02d" $((TRAIN_SECONDS / 3600)) $((TRAIN_SECONDS % 3600 / 60)) $((TRAIN_SECONDS % 60)))
experiment_of() { local words=($1); echo "${words[0]#experiment=}"; }
trains() { [[ " ${TRAINS[*]} " == *" $1 "* ]]; }

mkdir -p "$LOG_DIR"
if [[ "$PYTHON" != echo ]]; then
  # convert the packaged model once, before the processes start (they would wait on its lock)
  "$PYTHON" -c "from editlab.models.packaged import SMOLLM2_135M, ensure_converted; ensure_converted(SMOLLM2_135M)"
fi

pids=()
for name in $ONLY; do
  extra=""
  trains "$name" && extra="+fit.trainer.max_time=\"$max_time\""
  # shellcheck disable=SC2086  # the overrides are words
  OMP_NUM_THREADS=$THREADS "$PYTHON" -m editlab.train ${RUN[$name]} \
    experiment_name="$(experiment_of "${RUN[$name]}")_gpu_${name}" $DEVICE $extra \
    >"$LOG_DIR/${name}.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done

# the second, disjoint test of each trained editor: the checkpoint its run tested
pids=()
for name in $ONLY; do
  [[ -n "${SECOND[$name]+set}" ]] || continue
  if [[ "$PYTHON" == echo ]]; then
    ckpt="CKPT"
  else
    ckpt=$(sed -n "s/.*testing the best checkpoint's editor: \(.*\) (val\/.*/\1/p" "$LOG_DIR/${name}.log" | tail -1)
  fi
  if [[ -z "$ckpt" ]]; then
    echo "$name: no validated checkpoint in $LOG_DIR/${name}.log; no second test" >&2
    status=1
    continue
  fi
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=$THREADS "$PYTHON" -m editlab.train ${SECOND[$name]} ckpt_path="$ckpt" \
    experiment_name="$(experiment_of "${SECOND[$name]}")_gpu_${name}_second" $DEVICE \
    >"$LOG_DIR/${name}_second.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done

if [[ "$PYTHON" == echo ]]; then
  cat "$LOG_DIR"/*.log
else
  for log in "$LOG_DIR"/*.log; do
    echo "== $log"
    grep -a "testing the\|run folder" "$log"
    sed -n '/summary (/,$p' "$log" | grep -av "^\[\|Testing\|Epoch" | head -60
  done
fi
exit $status
