"""The docs: every command and code block is run by a test or marked
illustrative, and the worked example runs as printed."""

import glob
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests import docs
from tests import runner

GUIDE = 'docs/writing-a-trainer.md'


def referenced_names() -> set[str]:
  """Block names that some test fetches with docs.block/docs.commands."""
  names = set()
  for path in glob.glob(os.path.join(runner.REPO, 'tests', '**', '*.py'),
                        recursive=True):
    with open(path, encoding='utf-8') as f:
      names.update(re.findall(
          r"docs\.(?:block|commands)\(\s*[\w'./-]+,\s*'([\w-]+)'\)", f.read()))
  return names


@pytest.mark.parametrize('page', docs.pages())
def test_every_code_block_is_run_by_a_test_or_marked_illustrative(page):
  referenced = referenced_names()
  for name, language, code in docs.blocks(page):
    if language not in ('python', 'bash'):
      continue  # Output shown (text), not something to run.
    first = code.strip().splitlines()[0] if code.strip() else ''
    if 'illustrative' in first:
      continue
    assert name, f'{page}: an unnamed {language} block not marked ' \
        f'illustrative:\n{code[:300]}'
    assert name in referenced, f'{page}: block {name!r} is run by no test'


def test_the_guide_prints_the_example_files_whole():
  for code, path in ((docs.block(GUIDE, 'example-module'),
                      'examples/regression.py'),
                     (docs.block(GUIDE, 'example-config'),
                      'examples/regression_config.py'),
                     (docs.block(GUIDE, 'extras-module'), 'examples/extras.py'),
                     (docs.block(GUIDE, 'extras-config'),
                      'examples/extras_config.py')):
    with open(os.path.join(runner.REPO, path), encoding='utf-8') as f:
      assert code == f.read(), path


def test_the_worked_example_trains_exports_and_serves_as_printed(tmp_path):
  # The printed commands, with /tmp/ moved under this test's directory.
  for command in docs.commands(GUIDE, 'example-run'):
    result = run_printed(command, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    if '--mode=export' not in command:
      final = runner.final_eval(result.stdout)
      assert final['examples'] == 2048 and final['abs_error'] < 0.05, final
  code = docs.block(GUIDE, 'example-serve').replace('/tmp/', f'{tmp_path}/')
  serve_lines = []
  exec(compile(code, GUIDE, 'exec'), {'print': serve_lines.append})  # pylint: disable=exec-used
  (prediction,) = serve_lines
  expected = np.sin(1.5) + 0.5 * 0.25  # The function learned, at that point.
  assert float(tf.reshape(prediction, [])) == pytest.approx(expected, abs=0.1)


def run_printed(command: str, tmp_path, timeout=300):
  """Runs a printed `python ...` command from the repository, /tmp/ moved
  under tmp_path; returns the CompletedProcess."""
  argv = shlex.split(command.replace('/tmp/', f'{tmp_path}/'), comments=True)
  assert argv[0] == 'python', command
  return subprocess.run(
      [sys.executable, *argv[1:]], cwd=runner.REPO, capture_output=True,
      text=True, timeout=timeout,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'), check=False)


def test_the_running_examples_run_as_printed(tmp_path):
  printed, mirrored = docs.commands('docs/running.md', 'run-examples')
  result = run_printed(printed, tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'max_to_keep: 3' in result.stdout  # Every key, not only the file's.
  assert not os.listdir(tmp_path)  # --print_config writes nothing.
  result = run_printed(mirrored, tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  assert runner.final_eval(result.stdout)['examples'] == 360
  assert 'on 4 replica(s)' in result.stderr


def test_the_key_table_is_the_schema():
  from trainer import schema  # pylint: disable=import-outside-toplevel
  with open(os.path.join(runner.REPO, 'docs', 'running.md')) as f:
    text = f.read()
  table = text.split('<!-- schema:begin -->\n')[1].split('\n<!-- schema:end')[0]
  assert table == schema.describe()


def test_the_readme_commands_are_what_ci_and_the_tests_run():
  train, test = docs.commands('README.md', 'setup')
  # CI runs the second command as printed (.ci/run extracts it).
  printed = subprocess.run(['bash', '.ci/run', '--print'], cwd=runner.REPO,
                           capture_output=True, text=True, check=True)
  assert printed.stdout.strip() == test
  assert test.endswith('python -m pytest')
  # The first trains the default experiment: tests/main_test.py runs
  # `python main.py` with no flags (test_default_run_reaches_accuracy_bound).
  assert train.endswith('&& python main.py')


def test_the_tour_command_runs_as_printed(tmp_path):
  (command,) = docs.commands('README.md', 'tour-run')
  result = run_printed(command, tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  assert runner.final_eval(result.stdout)['examples'] == 360
  assert os.path.exists(tmp_path / 'tour' / 'ckpt-40.index')


def test_the_replica_check_of_the_example_passes_as_printed(tmp_path):
  (command,) = docs.commands(GUIDE, 'check-replicas')
  result = run_printed(command, tmp_path)
  assert result.returncode == 0, result.stdout + result.stderr[-2000:]
  assert result.stdout.startswith('PASS: RegressionTrainer after 10 steps, '
                                  '1 vs 2 replicas')
  # TensorFlow's Python logger prints through absl's handler alone, as in
  # main.py: no second copy of each line in its own format.
  assert 'INFO:tensorflow:' not in result.stderr, result.stderr[-2000:]


def test_the_extras_example_runs_as_printed(tmp_path):
  (command,) = docs.commands(GUIDE, 'extras-run')
  result = run_printed(command, tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  final = runner.final_eval(result.stdout)
  assert {'auc', 'f1', 'median_loss', 'eval_examples'} <= set(final)
  assert final['eval_examples'] == 360
  train = runner.summary_values(str(tmp_path / 'extras' / 'train'))
  evals = runner.summary_values(str(tmp_path / 'extras' / 'eval'))
  assert [step for step, _ in evals['note']] == [40]
  assert 'metrics/auc' in train and 'metrics/median_loss' in evals


def _anchors(path: str) -> set[str]:
  """GitHub's anchors of a markdown file's headings (outside code blocks)."""
  anchors, fenced = set(), False
  with open(path, encoding='utf-8') as f:
    for line in f:
      if line.startswith('```'):
        fenced = not fenced
      elif not fenced and line.startswith('#'):
        title = line.lstrip('#').strip().lower()
        anchors.add(re.sub(r'[^\w\- ]', '', title).replace(' ', '-'))
  return anchors


@pytest.mark.parametrize('page', docs.pages())
def test_every_relative_link_and_anchor_resolves(page):
  """Links and images to files of the repository, and #anchors of their
  headings: a page moved or a heading renamed breaks none silently."""
  source = os.path.join(runner.REPO, page)
  with open(source, encoding='utf-8') as f:
    text = re.sub(r'```.*?```', '', f.read(), flags=re.S)
  broken = []
  for target in re.findall(r'\]\(([^)\s]+)\)', text):
    if re.match(r'[a-z]+:', target):
      continue  # http(s), mailto: outside the repository.
    path, _, anchor = target.partition('#')
    path = (os.path.normpath(os.path.join(os.path.dirname(source), path))
            if path else source)
    if not os.path.exists(path):
      broken.append(f'{target} (no such file)')
    elif anchor and anchor not in _anchors(path):
      broken.append(f'{target} (no such heading)')
  assert not broken, f'{page}: {broken}'
