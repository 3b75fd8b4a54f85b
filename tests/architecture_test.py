"""Imports point one way: command line -> experiment -> controller -> trainer
loop -> step -> parts (docs/architecture.md); no module over ~400 lines."""

import ast
import glob
import os

import pytest

from tests import runner

# Each module's layer: a module imports only modules of its own layer or
# below. Leaves (0) are used everywhere.
LAYERS = {
    'trainer': 0, 'trainer.errors': 0, 'trainer.schema': 0,
    'trainer.cluster': 0,
    'trainer.parts': 1, 'trainer.optimization': 1, 'trainer.cluster.': 1,
    'trainer.actions': 1,
    'trainer.monitoring': 1, 'trainer.persistence': 1,
    'trainer.settings': 2, 'trainer.step': 2,
    'trainer.loops': 3, 'trainer.coordinated': 3,
    'trainer.wiring': 4, 'trainer.trainer': 4,
    'trainer.controller': 5,
    'trainer.experiment': 6,
}


def layer(module: str):
  """The layer of a trainer.* module (the longest matching prefix)."""
  best = None
  for prefix, rank in LAYERS.items():
    if module == prefix or module.startswith(
        prefix if prefix.endswith('.') else prefix + '.'):
      if best is None or len(prefix) > len(best[0]):
        best = (prefix, rank)
  return None if best is None else best[1]


def module_name(path: str) -> str:
  rel = os.path.relpath(path, runner.REPO)[:-len('.py')]
  return rel.replace(os.sep, '.').removesuffix('.__init__')


def trainer_imports(path: str) -> set[str]:
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      found.update(f'{node.module}.{a.name}' for a in node.names)
      found.add(node.module)
  return {name for name in found if name.startswith('trainer.')}


SOURCES = sorted(glob.glob(os.path.join(runner.REPO, 'trainer', '**', '*.py'),
                           recursive=True))


@pytest.mark.parametrize('path', SOURCES,
                         ids=lambda p: os.path.relpath(p, runner.REPO))
def test_imports_point_down(path):
  me = module_name(path)
  mine = layer(me)
  assert mine is not None, f'{me} has no layer in LAYERS'
  for name in trainer_imports(path):
    theirs = layer(name)
    if theirs is None:
      continue  # e.g. 'trainer.cluster.STRATEGIES' resolved by its package
    assert theirs <= mine, f'{me} (layer {mine}) imports {name} (layer {theirs})'


@pytest.mark.parametrize('path', SOURCES + sorted(
    glob.glob(os.path.join(runner.REPO, 'models', '*.py')) +
    glob.glob(os.path.join(runner.REPO, 'input', '*.py'))),
                         ids=lambda p: os.path.relpath(p, runner.REPO))
def test_no_module_over_400_lines(path):
  with open(path, encoding='utf-8') as f:
    lines = len(f.readlines())
  assert lines <= 420, f'{path}: {lines} lines'


def test_the_trainer_class_holds_the_contract_and_the_wiring():
  with open(os.path.join(runner.REPO, 'trainer', 'trainer.py')) as f:
    tree = ast.parse(f.read())
  (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef)]
  assert cls.end_lineno - cls.lineno <= 250
