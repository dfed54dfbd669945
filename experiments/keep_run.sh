# Sourced by the experiment scripts (robust_table.sh, lake_runs.sh): what of a
# training workdir is kept in results/.
#
#   keep_run WORKDIR OUT STEP
#
# copies config.json, metrics.jsonl and checkpoint STEP (the final one, only it) from
# WORKDIR to OUT/, each through a temp name and a rename, so that a stopped script
# leaves the previous copy or the new one, never half of one.
keep_run() {
  local workdir=$1 out=$2 step=$3 f
  for f in config.json metrics.jsonl; do
    # Two commands, not "cp && mv": under set -e a failed cp on the left of && goes on.
    cp "$workdir/$f" "$out/.$f.tmp"
    mv -f "$out/.$f.tmp" "$out/$f"
  done
  rm -rf "$out/.checkpoints.tmp" "$out/.checkpoints.old"
  mkdir -p "$out/.checkpoints.tmp"
  cp -r "$workdir/checkpoints/$step" "$out/.checkpoints.tmp/"
  [ -d "$out/checkpoints" ] && mv "$out/checkpoints" "$out/.checkpoints.old"
  mv "$out/.checkpoints.tmp" "$out/checkpoints"
  rm -rf "$out/.checkpoints.old"
}
