"""distloop: train and evaluate one experiment.

  python main.py                                   # digits MLP, default config
  python main.py --config=configs/digits_mlp.py:smoke --print_config
  python main.py --strategy=mirrored --num_cpu_devices=4 \
      --config=configs/digits_mlp.py --config.train.steps=500 --model_dir=/tmp/r

The last line printed is the held-out evaluation, e.g.
`final eval: accuracy=0.9722 examples=360 loss=0.09`.
A bad flag or config value exits with status 2 and a one-line error.
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from trainer import strategies
from trainer.errors import UserError

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, 'configs', 'digits_mlp.py')

config_flags.DEFINE_config_file(
    'config', DEFAULT_CONFIG,
    'Experiment config: configs/FILE.py[:VARIANT]; override keys with '
    '--config.KEY=VALUE.')
flags.DEFINE_string('model_dir', None, 'Output directory (default: '
                    'runs/<config>-<timestamp>).')
flags.DEFINE_string('strategy', 'default',
                    f'One of: {", ".join(strategies.STRATEGIES)}.')
flags.DEFINE_string('tpu', '', 'With --strategy=tpu: a TPU name, '
                    'grpc://HOST:PORT, or "local" on a TPU VM.')
flags.DEFINE_float('tpu_timeout', 300.0, 'Seconds to wait for the TPU.')
flags.DEFINE_integer('num_cpu_devices', 1, 'Split the host CPU into N logical '
                     'devices (N replicas for --strategy=mirrored).')
flags.DEFINE_bool('deterministic', False, 'Seed everything and enable op '
                  'determinism: two runs give bitwise-identical checkpoints.')
flags.DEFINE_bool('print_config', False, 'Print the resolved config and exit.')
FLAGS = flags.FLAGS


def fail(message: str):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(UserError.EXIT_CODE)


def parse_flags(argv):
  """absl flag parsing, with every mistake reported in one line."""
  try:
    rest = FLAGS(argv)
    FLAGS.config  # pylint: disable=pointless-statement  (loads the file now)
  except (flags.Error, IOError, ValueError, TypeError, KeyError,
          AttributeError) as e:
    fail(one_line(e))
  if len(rest) > 1:
    fail(f'unexpected argument(s) {rest[1:]}; flags take the form --name=value')
  return rest


def one_line(error: Exception) -> str:
  """The informative last line of a (possibly multi-line) error message."""
  lines = [l.strip() for l in str(error).strip().splitlines() if l.strip()]
  return lines[-1] if lines else type(error).__name__


def main(argv):
  del argv
  config = FLAGS.config
  if FLAGS.print_config:
    print(config)
    return
  # Imported here: TensorFlow starts only once flags are known to be valid.
  from trainer import experiment  # pylint: disable=import-outside-toplevel
  from trainer.controller import format_metrics  # pylint: disable=import-outside-toplevel
  try:
    strategies.configure_cpu_devices(FLAGS.num_cpu_devices)
    metrics = experiment.run(
        config,
        model_dir=FLAGS.model_dir or experiment.default_model_dir(
            FLAGS['config'].config_filename if hasattr(
                FLAGS['config'], 'config_filename') else 'config'),
        strategy_name=FLAGS.strategy, tpu=FLAGS.tpu,
        tpu_timeout=FLAGS.tpu_timeout, deterministic=FLAGS.deterministic)
  except UserError as e:
    fail(str(e))
  print(f'final eval: {format_metrics(metrics)}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
