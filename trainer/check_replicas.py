r"""Replica self-check: does your Trainer give the same weights on 1 and N replicas?

  python -m trainer.check_replicas --config=configs/digits_mlp.py:smoke \
      --num_replicas=4 --steps=20

Runs the config's Trainer for `--steps` steps on one device and, from the same
initial weights and data, on N logical CPU replicas (MirroredStrategy), then
compares every weight. With the same global batch the two runs see the same
examples, so a correct step gives the same weights up to float rounding; a
loss averaged per replica instead of over the global batch, gradients summed
twice or not at all, or batch statistics that depend on the replica split show
up as a mismatch. Run it on your own Trainer subclass before renting a pod.

Prints one line per variable that disagrees and a verdict; exits 0 when every
weight agrees within --rtol/--atol, 1 when not, 2 on a bad flag.
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

# pylint: disable=g-import-not-at-top,wrong-import-position
from trainer import cli
from trainer import strategies
from trainer.errors import UserError

DEFAULT_CONFIG = os.path.join(HERE, 'configs', 'digits_mlp.py')
cli.use_default_config(sys.argv, DEFAULT_CONFIG)
config_flags.DEFINE_config_file(
    'config', DEFAULT_CONFIG,
    'Experiment config: configs/FILE.py[:VARIANT].')
flags.DEFINE_integer('num_replicas', 4, 'Replicas to compare against one.')
flags.DEFINE_integer('steps', 20, 'Optimizer steps to run on each.')
flags.DEFINE_float('rtol', 1e-5, 'Relative tolerance per weight.')
flags.DEFINE_float('atol', 1e-6, 'Absolute tolerance per weight.')
FLAGS = flags.FLAGS


def run_weights(trainer, steps: int, initial_weights=None):
  """Trains `steps` steps from `initial_weights`; returns (weights, metrics)."""
  if initial_weights is not None:
    trainer.model.set_weights(initial_weights)
  dataset = trainer.distribute_dataset('train',
                                       batch_size=trainer.global_batch_size)
  metrics = trainer.train(iter(dataset), steps)
  return trainer.model.get_weights(), metrics


def compare(trainer_cls, config, *, num_replicas: int, steps: int,
            rtol: float = 1e-5, atol: float = 1e-6):
  """Trains on 1 and on `num_replicas` logical CPUs and compares weights.

  Needs at least `num_replicas` logical CPUs (strategies.configure_cpu_devices).

  Returns:
    (ok, report): ok is True when every weight agrees; report lists lines of
    'variable: max abs diff, max rel diff' for those that do not, and the
    metrics of both runs.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  devices = [d.name for d in tf.config.list_logical_devices('CPU')]
  if len(devices) < num_replicas:
    raise UserError(f'flag --num_replicas={num_replicas} needs that many '
                    f'logical CPUs; only {len(devices)} exist')
  tf.keras.utils.set_random_seed(config.seed)
  one = trainer_cls(config=config,
                    strategy=tf.distribute.OneDeviceStrategy(devices[0]))
  initial = one.model.get_weights()
  weights_1, metrics_1 = run_weights(one, steps)
  many = trainer_cls(
      config=config,
      strategy=strategies.mirrored_strategy(devices[:num_replicas]))
  weights_n, metrics_n = run_weights(many, steps, initial)

  report, ok = [], True
  names = [v.path for v in one.model.weights]
  for name, a, b in zip(names, weights_1, weights_n):
    if not np.allclose(a, b, rtol=rtol, atol=atol):
      ok = False
      abs_diff = float(np.max(np.abs(a - b)))
      rel_diff = float(np.max(np.abs(a - b) / (np.abs(a) + 1e-12)))
      report.append(f'  {name}: max abs diff {abs_diff:.3g}, '
                    f'max rel diff {rel_diff:.3g}')
  report.append(f'  metrics on 1 replica:  {_fmt(metrics_1)}')
  report.append(f'  metrics on {num_replicas} replicas: {_fmt(metrics_n)}')
  return ok, report


def _fmt(metrics):
  return ' '.join(f'{k}={v:.6g}' for k, v in sorted(metrics.items()))


def main(argv):
  del argv
  # pylint: disable=import-outside-toplevel
  import models  # noqa: F401  (registers the trainers)
  from trainer import registry
  try:
    strategies.configure_cpu_devices(FLAGS.num_replicas)
    config = FLAGS.config
    trainer_cls = registry.get(config.trainer)
    ok, report = compare(trainer_cls, config, num_replicas=FLAGS.num_replicas,
                         steps=FLAGS.steps, rtol=FLAGS.rtol, atol=FLAGS.atol)
  except UserError as e:
    cli.fail(str(e))
  verdict = 'PASS' if ok else 'FAIL'
  print(f'{verdict}: {trainer_cls.__name__} after {FLAGS.steps} steps, '
        f'1 vs {FLAGS.num_replicas} replicas '
        f'({"weights agree" if ok else "weights differ"} within '
        f'rtol={FLAGS.rtol:g}, atol={FLAGS.atol:g})')
  print('\n'.join(report))
  sys.exit(0 if ok else 1)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
