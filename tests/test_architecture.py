"""The structure the project promises: no import cycles between project modules, no module using another's private
names, and every list of stages derived from the one stage table."""
import ast
import os

import pytest

from var_jax import config as config_lib
from var_jax import objectives
from var_jax import stage_table
from var_jax import stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("var_jax", "launch", "configs", "benchmarks")


def _modules() -> dict[str, str]:
  """Dotted module name -> file path of every project module."""
  out = {}
  for package in PACKAGES:
    for directory, _, files in os.walk(os.path.join(ROOT, package)):
      for f in files:
        if f.endswith(".py"):
          rel = os.path.relpath(os.path.join(directory, f), ROOT)[:-3].replace(os.sep, ".")
          out[rel.removesuffix(".__init__")] = os.path.join(directory, f)
  return out


MODULES = _modules()


def _imports(path: str, name: str):
  """(imported project module, {local alias: module}) of every import in the file, at any depth (lazy imports
  inside functions count: they are still a dependency)."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  deps, aliases = set(), {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name in MODULES:
          deps.add(a.name)
          aliases[a.asname or a.name] = a.name
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      for a in node.names:
        full = f"{base}.{a.name}"
        if full in MODULES:
          deps.add(full)
          aliases[a.asname or a.name] = full
        elif base in MODULES:
          deps.add(base)
          if a.name.startswith("_"):
            aliases.setdefault("<from-import private>", []).append(f"{base}.{a.name}")
  return deps, aliases, tree


def test_no_import_cycles_between_project_modules():
  graph = {name: _imports(path, name)[0] - {name} for name, path in MODULES.items()}
  state = {}

  def visit(node, stack):
    state[node] = "open"
    for dep in sorted(graph.get(node, ())):
      if state.get(dep) == "open":
        cycle = stack[stack.index(dep):] + [dep]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      if dep not in state:
        visit(dep, stack + [dep])
    state[node] = "done"

  for name in sorted(graph):
    if name not in state:
      visit(name, [name])


def test_no_module_uses_another_modules_private_names():
  offences = []
  for name, path in MODULES.items():
    _, aliases, tree = _imports(path, name)
    offences += [f"{name} imports {p}" for p in aliases.pop("<from-import private>", [])]
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
          and isinstance(node.value, ast.Name) and node.value.id in aliases and aliases[node.value.id] != name):
        offences.append(f"{name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
  assert not offences, "\n".join(offences)


def test_stage_table_is_the_one_list_of_stages():
  assert config_lib.STAGES == stage_table.NAMES
  assert config_lib.stage_list(config_lib.base_config()) == list(stage_table.DEFAULT_PIPELINE)
  base = config_lib.base_config()
  for s in stage_table.STAGES:
    assert s.runner in stages.RUNNERS, s
    for section in s.sections:
      assert section in base, (s.name, section)
    if s.objective:
      assert objectives.get(s.objective).name == s.objective
      assert {"steps", "lr"} <= set(base[s.name]), f"training stage {s.name} needs config.{s.name}.steps and .lr"
    for r in s.reads:
      assert stage_table.NAMES.index(r) < stage_table.NAMES.index(s.name), f"{s.name} reads a later stage {r}"
  used = {s.objective for s in stage_table.STAGES if s.objective}
  assert used == set(objectives.OBJECTIVES), "an objective no stage trains, or a stage with an unknown objective"


def test_stage_dependencies_and_upstream():
  assert stage_table.depends_on("var") == ("reward", "score", "sft", "var")
  assert set(stage_table.depends_on("eval")) >= {"sft", "reward", "score", *stage_table.COMPARED}
  assert stage_table.upstream(["var", "dpo", "eval"]) == ("sft", "reward", "score")
  assert stage_table.upstream(["chosen"]) == ("sft",)
  with pytest.raises(ValueError, match="unknown stage 'rl'"):
    stage_table.get("rl")
