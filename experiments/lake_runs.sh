#!/usr/bin/env bash
# The README's table on Lake et al.'s 20 fixed one-shot runs: learners meta-trained
# 20-way 1-shot on the background alphabets only (--split=lake), natural and AQ, scored
# on the runs (all_runs.zip of github.com/brendenlake/omniglot) clean and under attack.
#
#   RUNS_ZIP=all_runs.zip DATA_DIR=../shared/data/omniglot bash experiments/lake_runs.sh metaoptnet metaoptnet_aq
#
# Rows: a learner (maml, protonet, r2d2, metaoptnet) natural, or with _aq AQ-trained
# (PGD-7 at 0.1, as the 5-way rows). Each trains $STEPS meta-steps of the preset
# omniglot_20w1s (MAML's 20-way settings) in $RUNS/omniglot_20w1s_lake_<row> (resuming if
# it exists); config.json, metrics.jsonl, train.log and the final checkpoint go to
# $OUT/<row>/ (default results/omniglot_20w1s_lake), and from there:
#   eval_lake_runs.json   the 20 runs' errors, clean and at L-inf 0.05, 0.1 and 0.3 (the
#                         last a masking check: it must reach ~100%) under PGD-20 (CE),
#                         PGD-20 (margin), APGD-20 on the summed loss and aimed at each query
# STAGES picks what runs (default "train eval"); STAGES=table prints the README's table
# of the named rows beside the published errors (experiments.lake_table).
set -euo pipefail
source "$(dirname "$0")/keep_run.sh"
STEPS=${STEPS:-3000}
DATA_DIR=${DATA_DIR:-../shared/data/omniglot}
RUNS_ZIP=${RUNS_ZIP:-$DATA_DIR/all_runs.zip}
RUNS=${RUNS:-runs}
OUT=${OUT:-results/omniglot_20w1s_lake}
PYTHON=${PYTHON:-python}
STAGES=${STAGES:-train eval}
LEARNERS="maml protonet r2d2 metaoptnet"
if [ "$#" -eq 0 ]; then
  echo "usage: bash $0 ROW [ROW...]   (a learner of: $LEARNERS; with _aq: AQ-trained)" >&2
  exit 2
fi
has() { [[ " $STAGES " == *" $1 "* ]]; }
for name in "$@"; do
  learner=${name%_aq}
  if [[ " $LEARNERS " != *" $learner "* ]]; then
    echo "error: unknown row $name; use one of $LEARNERS, each alone or with _aq" >&2
    exit 2
  fi
done
if has eval && [ ! -e "$RUNS_ZIP" ]; then
  echo "error: $RUNS_ZIP not found; put all_runs.zip (github.com/brendenlake/omniglot," \
       "python/one-shot-classification/) there or set RUNS_ZIP=" >&2
  exit 2
fi
if has table; then
  dirs=()
  for name in "$@"; do dirs+=("$OUT/$name"); done
  "$PYTHON" -m experiments.lake_table "${dirs[@]}"
  exit 0
fi
for name in "$@"; do
  learner=${name%_aq}
  objective=natural
  [ "$name" != "$learner" ] && objective=aq
  workdir="$RUNS/omniglot_20w1s_lake_$name"
  out="$OUT/$name"
  mkdir -p "$out"
  if has train; then
    { time "$PYTHON" -m experiments.train --preset=omniglot_20w1s --split=lake \
        --learner="$learner" --objective="$objective" --batch_norm=batch \
        --workdir="$workdir" --data_dir="$DATA_DIR" --num_steps="$STEPS" \
        --checkpoint_every=250 --keep_checkpoints=2 --log_every=50 --eval_every=1000 ; } \
        >> "$out/train.log" 2>&1
    keep_run "$workdir" "$out" "$STEPS"
  fi
  if has eval; then
    { time "$PYTHON" -m experiments.evaluate_lake --runs="$RUNS_ZIP" --workdir="$out" \
        --epsilons=0.05,0.1,0.3 --attacks=pgd,margin,apgd --attack_steps=20 --notensorboard \
        --output="$out/eval_lake_runs.json" ; } > "$out/evaluate_lake.log" 2>&1
  fi
done
