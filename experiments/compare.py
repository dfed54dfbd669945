r"""Compare trained runs: one table and two figures from their workdirs' kept JSON files.

  python -m experiments.compare runs/a runs/b ... [--markdown] [--output_dir=DIR] [--name=NAME]

Prints one row per workdir (model, objective, meta-steps, wall time, clean and
robust accuracy at each epsilon with 95% intervals; ``advmaml.eval.compare`` says
which files and how the wall time is counted) and writes DIR/robust_NAME.png
(accuracy against epsilon, one line per run) and DIR/val_NAME.png (validation
accuracy against meta-steps).
"""

import sys

from absl import app, flags, logging

from advmaml.eval.compare import Column, CompareError, summarize, table, write_figures
from experiments import cli

MARKDOWN = flags.DEFINE_bool("markdown", False, "Print the table as Markdown (for the README).")
OUTPUT_DIR = flags.DEFINE_string("output_dir", "compare", "Folder for the two figures.")
NAME = flags.DEFINE_string("name", "", "Suffix of the figure names: robust_<name>.png, val_<name>.png.")
EVAL_FILES = flags.DEFINE_string("eval_files", "eval_test*.json",
                                 "Glob of the evaluation records read in each workdir.")
COLUMNS = flags.DEFINE_multi_string(
    "column", [], "Extra columns LABEL=FILE:METRIC, one per epsilon of METRIC@eps in each "
    "workdir's FILE (METRIC=masking_checks: how many checks passed); they replace the "
    "robust-accuracy columns. Repeat the flag for more.")


def main(argv):
  workdirs = argv[1:]
  if not workdirs:
    cli.fail("give the training workdirs to compare, e.g. python -m experiments.compare "
             "runs/a runs/b")
  try:
    columns = tuple(Column.parse(spec) for spec in COLUMNS.value)
    runs = [summarize(w, EVAL_FILES.value, columns) for w in workdirs]
  except CompareError as e:
    cli.fail(str(e))
  with cli.one_line_errors():
    figures = write_figures(runs, OUTPUT_DIR.value, NAME.value)
  sys.stdout.write(table(runs, markdown=MARKDOWN.value, columns=columns) + "\n")
  for path in figures:
    logging.info("written to %s", path)


if __name__ == "__main__":
  app.run(main)
