#!/usr/bin/env bash
# Train and evaluate the robust objectives of the README's results table on
# Omniglot 5-way 1-shot (vinyals split), one after another.
#
#   STEPS=3000 DATA_DIR=../shared/data/omniglot bash experiments/robust_table.sh aq rmaml adml
#
# Each objective trains in $RUNS/<objective>_5w1s (resuming if it exists), then is
# evaluated on 600 test episodes, clean and under PGD-20 + margin + APGD (worst case
# per example; with the default --per_example also those aimed at each query example,
# summed_robust_accuracy@eps being the summed-loss attacks alone) at L-inf epsilon
# 0.025, 0.05 and 0.1. Logs, metrics, config, eval JSON
# and plots are copied to $OUT/omniglot_5w1s_vinyals_<objective>/.
# TRAIN_FLAGS adds training flags; the README's table was trained before the
# training attack's default became PGD's last iterate, so reproducing it (or
# resuming those runs) takes TRAIN_FLAGS=--train_attack_best.
set -euo pipefail
STEPS=${STEPS:-60000}
DATA_DIR=${DATA_DIR:-../shared/data/omniglot}
RUNS=${RUNS:-runs}
OUT=${OUT:-results}
PYTHON=${PYTHON:-python}
TRAIN_FLAGS=${TRAIN_FLAGS:-}
if [ "$#" -eq 0 ]; then
  echo "usage: STEPS=N bash $0 OBJECTIVE [OBJECTIVE...]   (e.g. aq rmaml adml)" >&2
  exit 2
fi
for obj in "$@"; do
  workdir="$RUNS/${obj}_5w1s"
  out="$OUT/omniglot_5w1s_vinyals_${obj}"
  mkdir -p "$out"
  { time "$PYTHON" -m experiments.train --preset=omniglot_5w1s --objective="$obj" \
      --workdir="$workdir" --data_dir="$DATA_DIR" --num_steps="$STEPS" \
      --checkpoint_every=250 --keep_checkpoints=2 --log_every=50 --eval_every=1000 \
      $TRAIN_FLAGS ; } \
      >> "$out/train.log" 2>&1
  { time "$PYTHON" -m experiments.evaluate --workdir="$workdir" --episodes=600 --seed=0 \
      --output="$workdir/eval_test_robust.json" \
      --epsilons=0.025,0.05,0.1 --attacks=pgd,margin,apgd --attack_steps=20 ; } \
      > "$out/evaluate_robust.log" 2>&1
  cp "$workdir/config.json" "$workdir/metrics.jsonl" "$workdir"/eval_test_robust.json \
     "$workdir"/*.png "$out/"
done
