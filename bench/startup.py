"""Time to first step: `python main.py` from process start to its first step
done, for every shipped config, and against another checkout.

  python bench/startup.py                       # this checkout
  python bench/startup.py --baseline=DIR        # and DIR, e.g. a git worktree
                                                # of an earlier commit
  python bench/startup.py --baseline=. --baseline_python=OLD/bin/python
                                                # this checkout, under another
                                                # environment's packages

Each run is a real `main.py` (the config's model, data and training config,
one step per inner loop), killed after its first progress line, which the
run prints once the first step is done. Markers are read off the absl log
timestamps: 'built' (the Trainer exists: imports, strategy, data read,
model and optimizer built) and 'first step'; each also as the CPU seconds
the process had used by then, which a machine shared with other jobs
inflates less than wall time. With --baseline, every round runs both
checkouts of each config back to back, in an order that alternates from
round to round (bench/harness.py); the ratio is the median of the per-round
ratios, with their range.

No TensorFlow here: all of it happens in the processes started.
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from bench import harness
from bench import models_startup

REPO = models_startup.REPO
CONFIGS = ('configs/digits_mlp.py', 'configs/cifar_resnet20.py:synthetic',
           'configs/lm_transformer.py', 'configs/imagenet_resnet50.py:smoke')

flags.DEFINE_string('baseline', '', 'A checkout to compare with (e.g. `git '
                    'worktree add /tmp/base COMMIT`); empty: this one alone.')
flags.DEFINE_string('baseline_python', '', 'The interpreter that runs the '
                    'baseline (e.g. another virtualenv\'s bin/python, to '
                    'compare package versions); empty: this one.')
flags.DEFINE_integer('rounds', 3, 'Runs of each config in each checkout.',
                     lower_bound=1)
flags.DEFINE_list('configs', list(CONFIGS), 'Configs to time (FILE[:VARIANT]).')
FLAGS = flags.FLAGS


def first_step(repo: str, config: str, python: str = '') -> dict:
  """{'built': (wall, CPU), 'first_step': (wall, CPU)} seconds since the
  process start of `python main.py --config=config` run in `repo`."""
  marks = {}
  with models_startup.MainRun(config, repo, python) as run:
    for message, mark in run.marks():
      if 'built' not in marks and ' replica(s) ' in message:
        marks['built'] = mark
      if models_startup.STEP_LINE.match(message):
        marks['first_step'] = mark
        break
  if len(marks) < 2:
    sys.stderr.write(''.join(run.tail))
    raise SystemExit(f'{repo}: main.py --config={config} printed no first '
                     'step')
  return marks


def cell(samples, key: str) -> str:
  """'median wall (median CPU)' of a marker over rounds, with the wall
  range."""
  walls = [s[key][0] for s in samples]
  cpus = [s[key][1] for s in samples if s[key][1] is not None]
  text = f'{harness.medians({0: walls})[0]:.1f}'
  if cpus:
    text += f' ({harness.medians({0: cpus})[0]:.1f})'
  return text + f' [{harness.format_range(harness.min_max(walls), ".1f")}]'


def main(argv):
  del argv
  checkouts = {'this': REPO}
  if FLAGS.baseline:
    if not os.path.isfile(os.path.join(FLAGS.baseline, 'main.py')):
      raise app.UsageError(f'--baseline={FLAGS.baseline!r} has no main.py; '
                           'pass a checkout, e.g. from `git worktree add '
                           '/tmp/base COMMIT`')
    checkouts['baseline'] = os.path.abspath(FLAGS.baseline)
  if FLAGS.baseline_python and not (FLAGS.baseline and os.access(
      FLAGS.baseline_python, os.X_OK)):
    raise app.UsageError(f'--baseline_python={FLAGS.baseline_python!r} '
                         + ('is not an executable interpreter' if
                            FLAGS.baseline else 'needs --baseline (e.g. '
                            '--baseline=. for this checkout)'))
  samples = {(c, name): [] for c in FLAGS.configs for name in checkouts}
  for r in range(FLAGS.rounds):
    for config in FLAGS.configs:
      for name in harness.back_and_forth(list(checkouts), r):
        python = FLAGS.baseline_python if name == 'baseline' else ''
        samples[config, name].append(first_step(checkouts[name], config,
                                                python))
        print(f'round {r + 1}/{FLAGS.rounds} {name:8} {config}: first step '
              f'{samples[config, name][-1]["first_step"][0]:.1f} s',
              flush=True)

  print('\ntime to first step of `python main.py`: median wall seconds since '
        'process start (median CPU seconds) [wall min-max]; load average '
        f'{os.getloadavg()[0]:.1f}\n')
  header = ['config']
  for name in checkouts:
    header += [f'{name}: built', f'{name}: first step']
  if 'baseline' in checkouts:
    header += ['  this / baseline']
  rows = [header]
  for config in FLAGS.configs:
    row = [config]
    for name in checkouts:
      row += [cell(samples[config, name], 'built'),
              cell(samples[config, name], 'first_step')]
    if 'baseline' in checkouts:
      ratios = harness.paired_ratios(
          [s['first_step'][0] for s in samples[config, 'this']],
          [s['first_step'][0] for s in samples[config, 'baseline']])
      row.append(f'{harness.medians({0: ratios})[0]:.2f} '
                 f'({harness.format_range(harness.min_max(ratios), ".2f")})')
    rows.append(row)
  harness.print_table(rows, [38] + [25] * (len(header) - 1))


if __name__ == '__main__':
  app.run(main)
