r"""The Markdown table of models scored on Lake's 20 one-shot runs, beside the published errors.

  python -m experiments.lake_table results/omniglot_20w1s_lake/metaoptnet results/omniglot_20w1s_lake/metaoptnet_aq

Each folder is a training workdir (config.json, metrics.jsonl) holding the
eval_lake_runs.json that ``experiments.evaluate_lake`` wrote; one row each: learner,
objective, meta-steps, wall time, and the mean error over the runs, clean and at each
epsilon, with 95% intervals (``advmaml.eval.lake_eval.lake_table``).
"""

import sys

from absl import app

from advmaml.eval.compare import CompareError
from advmaml.eval.lake_eval import lake_table
from experiments import cli


def main(argv):
  if len(argv) < 2:
    cli.fail("give the workdirs scored on Lake's runs, e.g. python -m experiments.lake_table "
             "results/omniglot_20w1s_lake/metaoptnet")
  try:
    sys.stdout.write(lake_table(argv[1:]) + "\n")
  except CompareError as e:
    cli.fail(str(e))


if __name__ == "__main__":
  app.run(main)
