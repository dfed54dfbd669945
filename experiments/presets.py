r"""Print every preset's whole setting as Markdown (what docs/presets.md holds).

  python -m experiments.presets > docs/presets.md
"""

from advmaml.config import presets_markdown

if __name__ == "__main__":
  print(presets_markdown(), end="")
