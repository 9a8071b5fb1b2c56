"""DESIGN.md's layer order, checked by parsing every import (function-local ones included): a
module imports only from its own layer or lower ones. No allow-list."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Lowest first (DESIGN.md "Layout"): the shared runtime; pure losses and samplers; models;
# weight loaders and data; evaluation; train; configs; experiments; the launcher and benchmarks.
LAYERS = (
  ("contrastive_jax.sharding", "contrastive_jax.hosts", "contrastive_jax.io",
   "contrastive_jax.callables"),
  ("contrastive_jax.losses", "contrastive_jax.sampling"),
  ("contrastive_jax.models",),
  ("contrastive_jax.weights", "contrastive_jax.data"),
  ("contrastive_jax.evaluation",),
  ("contrastive_jax.train",),
  ("configs",),
  ("experiments",),
  ("launch", "benchmarks"),
)


def layer_of(module: str) -> int | None:
  """The layer of a dotted module name of this project (None for anything else)."""
  best = None
  for level, prefixes in enumerate(LAYERS):
    for prefix in prefixes:
      if module == prefix or module.startswith(prefix + "."):
        best = level
  return best


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path):
  """(line, dotted name) of every absolute import in the file, `from x import y` as x.y too."""
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      yield node.lineno, node.module
      for alias in node.names:
        yield node.lineno, f"{node.module}.{alias.name}"


def _sources():
  for pattern in ("contrastive_jax/**/*.py", "configs/*.py", "experiments/**/*.py",
                  "benchmarks/*.py", "launch.py"):
    yield from sorted(ROOT.glob(pattern))


def test_every_module_has_a_layer():
  unplaced = [str(p.relative_to(ROOT)) for p in _sources() if layer_of(_module_name(p)) is None
              and _module_name(p) != "contrastive_jax"]
  assert unplaced == []


def test_no_module_imports_a_higher_layer():
  upward = []
  for path in _sources():
    own = layer_of(_module_name(path))
    if own is None:
      continue
    for line, name in _imports(path):
      other = layer_of(name)
      if other is not None and other > own:
        upward.append(f"{path.relative_to(ROOT)}:{line} imports {name} (layer {other} > {own})")
  assert upward == []


def test_the_checker_sees_an_upward_import(tmp_path):
  """The rule has teeth: a model importing the train state is reported."""
  fake = ROOT / "contrastive_jax" / "models" / "_upward_probe.py"
  source = "def f():\n  from contrastive_jax.train.state import TrainState\n"
  tree = ast.parse(source)
  names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
  assert layer_of(_module_name(fake)) == 2 and [layer_of(n) for n in names] == [5]
