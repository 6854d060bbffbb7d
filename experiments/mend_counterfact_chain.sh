#!/usr/bin/env bash
# MEND on SmolLM2-135M / CounterFact: the chain of runs whose last editor meets issue 4's bar
# (test on the first 200 records of counterfact-val.json, single edits: reliability 0.8025,
# generalization 0.720, locality 0.911, teacher-forced; docs/results/mend_counterfact.md).
#
#   bash experiments/mend_counterfact_chain.sh              # all five stages, ~3.6 h on 2 CPU threads
#   FROM=3 INIT=PATH/editor-step240.ckpt bash experiments/mend_counterfact_chain.sh   # from stage 3
#   PYTHON=echo bash experiments/mend_counterfact_chain.sh  # print the commands only
#
# Each stage is an experiment file, editlab/configs/experiment/mend_smollm2_counterfact_chain/stageN.yaml
# (N = 1-5, on the settings every stage shares: experiment/mend_smollm2_counterfact_chain.yaml).
# Stage 1 trains from scratch with a cosine learning rate; every later stage starts from the editor
# weights of a named checkpoint of the stage before (fit.init_from: a fresh Adam, step 0) with a new
# seed, so its records come in an order the editor has not seen, and a smaller cosine learning rate.
# Each stage validates every 120 or 200 steps (records 200-299 of counterfact-val.json), keeps every
# checkpoint and tests the one of highest val/edit_score.  Each stage hands on the checkpoint it
# tested, except stage 4, which hands on its last (step 360; it tested step 240).
# Every optimizer step trains 10 single edits edited independently in one batched pass, with the edit
# loss on both the literal prompt and the rephrase (method.edit_outer=both).
# This script adds only what belongs to one machine's run: the run folder and the checkpoint handed on.
# Run folders: $RUNS/<stage name>/ (hydra.run.dir); the checkpoints are 390 MB each.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
RUNS=${RUNS:-experiments/runs/mend_counterfact_chain}
FROM=${FROM:-1}        # first stage to run (1-5)
INIT=${INIT:-}         # editor checkpoint for stage FROM > 1: the one the stage before hands on
EXTRA=${EXTRA:-}       # more overrides for every stage (e.g. "trainer=gpu model.device=cuda")

# stage name (its run folder) | checkpoint (step) handed on to the next stage; stage N's settings:
# experiment=mend_smollm2_counterfact_chain/stageN
STAGES=(
  "scratch_cloc20|1400"
  "cont_seed1_cloc20|240"
  "cont_seed2_cloc22|120"
  "cont_seed3_cloc23|360"
  "cont_seed4_cloc21|240"
)
if [[ ! "$FROM" =~ ^[1-5]$ ]]; then
  echo "FROM must be a stage number 1-5, got '$FROM'" >&2
  exit 2
fi
if [[ "$FROM" -gt 1 && -z "$INIT" ]]; then
  echo "FROM=$FROM needs INIT, the checkpoint stage $((FROM - 1)) hands on" >&2
  exit 2
fi
if [[ "$FROM" -gt 1 && "$PYTHON" != echo && ! -f "$INIT" ]]; then
  echo "INIT=$INIT: no such checkpoint" >&2
  exit 2
fi

init="$INIT"
for ((i = FROM - 1; i < ${#STAGES[@]}; i++)); do
  IFS='|' read -r name hand_on <<<"${STAGES[$i]}"
  dir="$RUNS/$name"
  if [[ "$PYTHON" != echo && -e "$dir" ]]; then
    # a second run into the same folder would mix its checkpoints with the first one's
    echo "$dir exists: move it away or set RUNS to a new folder" >&2
    exit 2
  fi
  init_arg=()
  [[ -n "$init" ]] && init_arg=("fit.init_from=$init")
  # shellcheck disable=SC2086  # EXTRA holds words
  "$PYTHON" -m editlab.train "experiment=mend_smollm2_counterfact_chain/stage$((i + 1))" \
    "hydra.run.dir=$dir" "${init_arg[@]}" $EXTRA
  init="$dir/checkpoints/editor-step${hand_on}.ckpt"
  if [[ "$PYTHON" != echo && ! -f "$init" ]]; then
    echo "stage $((i + 1)) ($name) left no $init" >&2
    exit 1
  fi
done
