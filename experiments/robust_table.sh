#!/usr/bin/env bash
# The README's robust Omniglot 5-way K-shot tables (vinyals split, Conv4): train each
# row for the same number of meta-steps, keep its final checkpoint in results/, and
# evaluate it there as a reviewer would.
#
#   DATA_DIR=../shared/data/omniglot bash experiments/robust_table.sh natural aq rmaml adml
#   SHOT=5 DATA_DIR=../shared/data/omniglot bash experiments/robust_table.sh natural aq
#
# Rows (name: objective, batch-norm statistics): natural, aq, rmaml, adml (batch:
# transductive, MAML's rule) and natural_support, aq_support (support: the support set's
# statistics normalise the queries too); the other learners, natural and AQ-trained:
# protonet, r2d2, metaoptnet, protonet_aq, r2d2_aq, metaoptnet_aq; and the transfer
# baseline, clean (transfer) and adversarially trained (transfer_at). SHOT (1 or 5) picks
# the preset omniglot_5w${SHOT}s; the transfer rows, which classify images rather than
# episodes, train at both on the 1-shot mini-batches (1 support + 1 query image per class
# of each episode: at SHOT=5 --train_k_shot=1 --q_query=1), so that, as in Goldblum et al., one
# classifier is scored at both shots, only its test-time head fitted on 1 or 5 images
# per class. Each trains $STEPS meta-steps in
# $RUNS/omniglot_5w${SHOT}s_<name> (resuming if it exists); config.json, metrics.jsonl,
# train.log and the final checkpoint go to $OUT/<name>/ (default
# $RESULTS/omniglot_5w${SHOT}s_3k, RESULTS=results), and from there:
#   eval_test_robust.json   600 episodes, L-inf 0.05 and 0.1: PGD-20 (CE), PGD-20 (margin),
#                           APGD-20 (DLR) on the summed loss, the same aimed at each query
#                           (--per_example, the default), each query attacked alone
#                           (--attack_alone; 1-shot only: with 25 queries it more
#                           than doubles the work, and no 5-shot table reports it; ALONE=0|1
#                           overrides), and the masking checks (black box: Square
#                           with 1000 queries; large epsilon 0.3; loss progress;
#                           transfer from the natural row)
#   eval_test_autoattack.json  the same episodes under standard AutoAttack ($AA_FLAGS)
#   certify_test.json       randomized smoothing, sigma 0.25, L2 radii 0.1, 0.25, 0.5
#                           (natural and aq rows)
#   eval_test_large_eps_*.json  (STAGES=large_eps, not in the default) the first 100
#                           episodes at L-inf 0.3: the summed attacks at 20 and 100 steps
#                           and the per-example worst case at 20 (the evaluations kept in
#                           results/ predate the masking check's aimed attacks: their check
#                           is the summed attacks at 20)
# STAGES picks what runs (default "train eval autoattack certify"); STAGES=table prints
# the README's two robustness tables of the named rows from those files
# (experiments.compare) and writes their figures to $RESULTS/compare/; STAGES=learners
# prints the learners table (clean and the per-example worst case, training length and
# wall time) and writes its figures to $RESULTS/compare/learners_*. With SHOT="1 5" the
# tables hold each row once per shot that has its folder, with a task column:
#   SHOT="1 5" STAGES=learners bash experiments/robust_table.sh natural aq protonet_aq
set -euo pipefail
source "$(dirname "$0")/keep_run.sh"
SHOT=${SHOT:-1}
shots=($SHOT)
[ "${#shots[@]}" -gt 0 ] || shots=(none)
for shot in "${shots[@]}"; do
  case "$shot" in 1|5) ;; *) echo "error: SHOT=$SHOT; use SHOT=1, SHOT=5 or (tables) SHOT=\"1 5\"" >&2; exit 2 ;; esac
done
STEPS=${STEPS:-3000}
DATA_DIR=${DATA_DIR:-../shared/data/omniglot}
RUNS=${RUNS:-runs}
RESULTS=${RESULTS:-results}
PYTHON=${PYTHON:-python}
STAGES=${STAGES:-train eval autoattack certify}
AA_FLAGS=${AA_FLAGS:---attack_preset=autoattack}
ALONE=${ALONE:-$([ "$SHOT" = 1 ] && echo 1 || echo 0)}
case "$ALONE" in 0|1) ;; *) echo "error: ALONE=$ALONE; use ALONE=1 (attack each query alone too) or ALONE=0" >&2; exit 2 ;; esac
ROWS="natural aq rmaml adml natural_support aq_support protonet r2d2 metaoptnet protonet_aq r2d2_aq metaoptnet_aq transfer transfer_at"
if [ "$#" -eq 0 ]; then
  echo "usage: bash $0 NAME [NAME...]   ($ROWS)" >&2
  exit 2
fi
has() { [[ " $STAGES " == *" $1 "* ]]; }
dirs=()
if [ "${#shots[@]}" -eq 1 ]; then
  PRESET=omniglot_5w${SHOT}s
  OUT=${OUT:-$RESULTS/${PRESET}_3k}
  TAG=$(basename "$OUT")
  for name in "$@"; do dirs+=("$OUT/$name"); done
else   # one table of several shots: each row once per shot, where it has been trained
  if [ -n "${OUT:-}" ] || ! { has table || has learners; }; then
    echo "error: SHOT=\"$SHOT\" is for STAGES=table or learners, the rows read from" \
         "\$RESULTS/omniglot_5w<K>s_3k (leave OUT unset); train and evaluate one SHOT at a time" >&2
    exit 2
  fi
  TAG=omniglot_5way_3k
  for name in "$@"; do
    for shot in "${shots[@]}"; do
      d="$RESULTS/omniglot_5w${shot}s_3k/$name"
      if [ -f "$d/config.json" ]; then dirs+=("$d"); else echo "note: no $d yet; left out" >&2; fi
    done
  done
  if [ "${#dirs[@]}" -eq 0 ]; then
    echo "error: none of the rows has a folder under $RESULTS/omniglot_5w{${SHOT// /,}}s_3k; train them first" >&2
    exit 2
  fi
fi
if has table; then
  "$PYTHON" -m experiments.compare "${dirs[@]}" --markdown --eval_files=eval_test_robust.json \
      --column="summed=eval_test_robust.json:summed_robust_accuracy" \
      --column="per-example=eval_test_robust.json:robust_accuracy" \
      --column="alone=eval_test_robust.json:alone_robust_accuracy" \
      --column="AutoAttack=eval_test_autoattack.json:robust_accuracy" \
      --column="masking checks=eval_test_robust.json:masking_checks" \
      --output_dir="$RESULTS/compare" --name="$TAG"
  certified=(); for d in "${dirs[@]}"; do [ -f "$d/certify_test.json" ] && certified+=("$d"); done
  if [ "${#certified[@]}" -gt 0 ]; then
    echo
    "$PYTHON" -m experiments.compare "${certified[@]}" --markdown --eval_files=certify_test.json \
        --column="certified L2=certify_test.json:certified_accuracy" \
        --output_dir="${TMPDIR:-/tmp}/robust_table_certified"   # its figures are not used
  fi
  exit 0
fi
if has learners; then
  "$PYTHON" -m experiments.compare "${dirs[@]}" --markdown --eval_files=eval_test_robust.json \
      --column="per-example=eval_test_robust.json:robust_accuracy" \
      --column="masking checks=eval_test_robust.json:masking_checks" \
      --output_dir="$RESULTS/compare" --name="learners_$TAG"
  exit 0
fi
for name in "$@"; do
  learner_flags=()
  case "$name" in
    natural|aq|rmaml|adml) objective=$name; bn=batch ;;
    natural_support|aq_support) objective=${name%_support}; bn=support ;;
    protonet|r2d2|metaoptnet) objective=natural; bn=batch; learner_flags=(--learner="$name") ;;
    protonet_aq|r2d2_aq|metaoptnet_aq)
      objective=aq; bn=batch; learner_flags=(--learner="${name%_aq}") ;;
    transfer|transfer_at) objective=$name; bn=batch
      learner_flags=(--learner=transfer --transfer_classes=4400)
      # The 1-shot rows' mini-batches (their preset's shape: their workdirs resume as they are).
      [ "$SHOT" = 5 ] && learner_flags+=(--train_k_shot=1 --q_query=1) ;;
    *) echo "error: unknown row $name; use $ROWS" >&2
       exit 2 ;;
  esac
  workdir="$RUNS/${PRESET}_$name"
  out="$OUT/$name"
  mkdir -p "$out"
  if has train; then
    { time "$PYTHON" -m experiments.train --preset="$PRESET" --objective="$objective" \
        --batch_norm="$bn" "${learner_flags[@]}" --workdir="$workdir" --data_dir="$DATA_DIR" --num_steps="$STEPS" \
        --checkpoint_every=250 --keep_checkpoints=2 --log_every=50 --eval_every=1000 ; } \
        >> "$out/train.log" 2>&1
    keep_run "$workdir" "$out" "$STEPS"
  fi
  common=(--workdir="$out" --data_dir="$DATA_DIR" --episodes=600 --seed=0 --epsilons=0.05,0.1
          --notensorboard --noplot)
  transfer=()
  alone=()
  [ "$ALONE" = 1 ] && alone=(--attack_alone)
  if [ "$name" != natural ] && [ -d "$OUT/natural/checkpoints" ]; then
    transfer=(--check_transfer_from="$OUT/natural")
  fi
  if has eval; then
    { time "$PYTHON" -m experiments.evaluate "${common[@]}" --attacks=pgd,margin,apgd \
        --attack_steps=20 "${alone[@]}" --check_black_box --square_queries=1000 \
        --check_large_epsilon=0.3 \
        --check_loss_progress "${transfer[@]}" --output="$out/eval_test_robust.json" ; } \
        >> "$out/evaluate_robust.log" 2>&1   # appended: a stopped evaluation resumes
  fi
  if has large_eps; then   # the large-epsilon check's residue, on the first 100 episodes
    probe=(--workdir="$out" --data_dir="$DATA_DIR" --episodes=100 --seed=0 --epsilons=0.3
           --attacks=pgd,margin,apgd --notensorboard --noplot)
    for steps in 20 100; do
      { time "$PYTHON" -m experiments.evaluate "${probe[@]}" --attack_steps="$steps" --noper_example \
          --output="$out/eval_test_large_eps_pgd$steps.json" ; } > "$out/evaluate_large_eps_pgd$steps.log" 2>&1
    done
    { time "$PYTHON" -m experiments.evaluate "${probe[@]}" --attack_steps=20 \
        --output="$out/eval_test_large_eps_per_example20.json" ; } \
        > "$out/evaluate_large_eps_per_example20.log" 2>&1
  fi
  if has autoattack; then
    { time "$PYTHON" -m experiments.evaluate "${common[@]}" --attacks=autoattack $AA_FLAGS \
        --output="$out/eval_test_autoattack.json" ; } >> "$out/evaluate_autoattack.log" 2>&1
  fi
  if has certify && { [ "$name" = natural ] || [ "$name" = aq ]; }; then
    { time "$PYTHON" -m experiments.certify --workdir="$out" --data_dir="$DATA_DIR" \
        --episodes=600 --seed=0 --sigma=0.25 --radii=0.1,0.25,0.5 \
        --output="$out/certify_test.json" ; } > "$out/certify.log" 2>&1
  fi
done
