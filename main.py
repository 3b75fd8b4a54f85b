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

# Hide TensorFlow's C++ INFO banner lines; warnings and errors still show.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

# pylint: disable=wrong-import-position
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from trainer import cli
from trainer import controller
from trainer import experiment
from trainer import preemption
from trainer import profiling
from trainer import strategies
from trainer import tf_config
from trainer.controller import format_metrics
from trainer.errors import UserError

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, 'configs', 'digits_mlp.py')

cli.use_default_config(sys.argv, DEFAULT_CONFIG)
config_flags.DEFINE_config_file(
    'config', DEFAULT_CONFIG,
    'Experiment config: configs/FILE.py[:VARIANT]; override keys with '
    '--config.KEY=VALUE.')
flags.DEFINE_string('mode', 'train', 'One of: train, eval, train_and_eval, '
                    'continuous_eval, export.')
flags.DEFINE_string('model_dir', None, 'Output directory (default: '
                    'runs/<config>-<timestamp>).')
flags.DEFINE_string('strategy', 'default',
                    f'One of: {", ".join(strategies.STRATEGIES)}.')
flags.DEFINE_string('worker_hosts', '', 'With --strategy=multi_worker_mirrored '
                    'and no TF_CONFIG: host:port of every worker, in order.')
flags.DEFINE_integer('task_index', None, "With --worker_hosts: this worker's "
                     'position in it, 0..N-1.')
flags.DEFINE_float('cluster_timeout', 300.0, 'With --strategy=multi_worker_'
                   'mirrored: seconds within which every worker must join the '
                   'cluster at start-up; otherwise exit 75 naming the missing '
                   'one.')
flags.DEFINE_string('tpu', '', 'With --strategy=tpu: a TPU name, '
                    'grpc://HOST:PORT, or "local" on a TPU VM.')
flags.DEFINE_float('tpu_timeout', 300.0, 'Seconds to wait for the TPU.')
flags.DEFINE_integer('num_cpu_devices', 1, 'Split the host CPU into N logical '
                     'devices (N replicas for --strategy=mirrored).')
flags.DEFINE_bool('deterministic', False, 'Seed everything and enable op '
                  'determinism: two runs give bitwise-identical checkpoints.')
flags.DEFINE_bool('print_config', False, 'Print the resolved config and exit.')
flags.DEFINE_string('profile_steps', '', 'START,END: trace training steps '
                    'START..END for TensorBoard\'s profile plugin (written to '
                    'model_dir/train/plugins/profile).')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = FLAGS.config
  if FLAGS.print_config:
    print(config)
    return
  model_dir = FLAGS.model_dir or experiment.default_model_dir(
      config_flags.get_config_filename(FLAGS['config']))
  try:
    profile_steps = profiling.parse_profile_steps(FLAGS.profile_steps)
    tf_config.set_from_flags(FLAGS.worker_hosts, FLAGS.task_index,
                             strategy=FLAGS.strategy)
    strategies.configure_cpu_devices(FLAGS.num_cpu_devices)
    metrics = experiment.run(
        config, model_dir=model_dir, mode=FLAGS.mode, strategy_name=FLAGS.strategy, tpu=FLAGS.tpu,
        tpu_timeout=FLAGS.tpu_timeout, num_cpu_devices=FLAGS.num_cpu_devices,
        cluster_timeout=FLAGS.cluster_timeout,
        deterministic=FLAGS.deterministic, profile_steps=profile_steps)
  except UserError as e:
    cli.fail(str(e))
  except preemption.Preempted as e:
    logging.warning('%s', e)
    _exit(preemption.EXIT_CODE)
  except controller.NonFiniteLoss as e:
    print(f'error: {e}', file=sys.stderr)
    _exit(controller.NonFiniteLoss.EXIT_CODE)
  except Exception as e:  # pylint: disable=broad-except
    # A worker that did not join or died: a TF error wherever this one was.
    cluster_error = strategies.cluster_error(e)
    if cluster_error is None:
      raise
    print(f'error: {cluster_error}', file=sys.stderr)
    sys.exit(cluster_error.EXIT_CODE)
  export_path = metrics.pop('export', None)
  if export_path:
    print(f'exported: {export_path}')
  if metrics:
    print(f'final eval: {format_metrics(metrics)}')
  _exit(0)


def _exit(code: int) -> None:
  """Exits once everything is on disk and printed, without waiting for
  interpreter shutdown.

  By now checkpoints are written (the controller waits for async saves),
  summary writers are closed and the output is flushed. Left to itself,
  shutdown can then take from one to tens of seconds: destroying a
  tf.data iterator of a multi-device (mirrored) pipeline waits for its
  background threads, which matters after a SIGTERM, when the cluster
  manager's grace period is running. Multi-worker processes do exit
  normally: TensorFlow's coordination service expects every task to pass its
  shutdown barrier.
  """
  sys.stdout.flush()
  sys.stderr.flush()
  logging.flush()
  if FLAGS.strategy != 'multi_worker_mirrored':
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
