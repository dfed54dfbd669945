"""The library's layout: no import cycles, and the README's layout section lists every file."""

from __future__ import annotations

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "advmaml"


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_modules() -> dict[str, pathlib.Path]:
  return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def module_level_imports(path: pathlib.Path, modules: set[str]) -> set[str]:
  """The advmaml modules ``path`` imports when it is imported (not those imported inside
  functions, which run later). ``from a.b import c`` names a.b.c if that is a module."""
  name = module_name(path)
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()

  def visit(statements):
    for node in statements:
      if isinstance(node, ast.Import):
        found.update(alias.name for alias in node.names)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:   # relative import
          anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(anchor + ([base] if base else []))
        for alias in node.names:
          full = f"{base}.{alias.name}"
          found.add(full if full in modules else base)
      elif isinstance(node, (ast.If, ast.Try)):   # module-level conditionals still run
        visit(node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", [])
              + [s for h in getattr(node, "handlers", []) for s in h.body])

  visit(ast.parse(path.read_text()).body)
  return {m for m in found if m in modules and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as a list of modules (first == last), or None."""
  state: dict[str, int] = {}   # 1: on the DFS stack, 2: done
  stack: list[str] = []

  def dfs(node):
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (cycle := dfs(nxt)):
        return cycle
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (cycle := dfs(node)):
      return cycle
  return None


def import_graph() -> dict[str, set[str]]:
  modules = library_modules()
  return {name: module_level_imports(path, set(modules)) for name, path in modules.items()}


def test_the_cycle_finder_finds_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles_inside_the_library():
  graph = import_graph()
  assert "advmaml.objectives.robust" in graph["advmaml.objectives"]   # the graph is real
  assert "advmaml.learners.base" in graph["advmaml.objectives.robust"]
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def listed_files(section: str) -> set[str]:
  """Paths under advmaml/ named by the layout's tree: a line "  name/" opens a folder,
  deeper lines "    file.py  what it does" name files in it."""
  block = section.split("```")[1]
  stack: list[tuple[int, str]] = []
  listed = set()
  for line in block.splitlines():
    if not line.strip() or line.strip().startswith("("):
      continue
    indent, name = len(line) - len(line.lstrip()), line.split()[0]
    while stack and stack[-1][0] >= indent:
      stack.pop()
    if name.endswith("/"):
      stack.append((indent, name.rstrip("/")))
    elif name.endswith(".py"):
      listed.add("/".join([d for _, d in stack] + [name]))
  return listed


def docstring_only(path: pathlib.Path) -> bool:
  body = ast.parse(path.read_text()).body
  return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def test_readme_layout_lists_every_library_file():
  readme = (REPO / "README.md").read_text()
  section = readme[readme.index("## Layout"):]
  listed = listed_files(section)
  assert "advmaml/learners/base.py" in listed and "advmaml/config.py" in listed
  files = [str(p.relative_to(REPO)) for p in sorted(PACKAGE.rglob("*.py"))
           if not (p.name == "__init__.py" and docstring_only(p))]   # package markers
  assert len(files) > 40
  missing = sorted(set(files) - listed)
  assert not missing, f"README's layout section does not list {missing}"
  stale = sorted(f for f in listed if not (REPO / f).exists())
  assert not stale, f"README's layout section lists files that do not exist: {stale}"


def test_docs_presets_is_current():
  """docs/presets.md is the one place a preset's whole setting is written out."""
  from advmaml.config import PRESETS, presets_markdown
  text = (REPO / "docs" / "presets.md").read_text()
  assert text == presets_markdown(), "regenerate: python -m experiments.presets > docs/presets.md"
  assert all(f"## `{name}`" in text for name in PRESETS)
