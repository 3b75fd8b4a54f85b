"""distloop: train and evaluate one experiment.

  python main.py                                   # digits MLP, default config
  python main.py --config=configs/digits_mlp.py:smoke --print_config
  python main.py --strategy=mirrored --num_cpu_devices=4 \
      --config=configs/digits_mlp.py --config.train.steps=500 --model_dir=/tmp/r

The last line printed is the held-out evaluation, e.g.
`final eval: accuracy=0.9861 examples=360 loss=0.03716`.
A bad flag or config value exits with status 2 and a one-line error, before
TensorFlow is even imported.
"""

import os
import sys

# Hide TensorFlow's C++ INFO banner lines; warnings and errors still show.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
# config.trainer = 'my_module:MyTrainer' imports from the working directory.
sys.path.insert(1, os.getcwd())

# pylint: disable=wrong-import-position
# SIGTERM is a preemption from the very start (imports, restore, tracing...).
from trainer.persistence import preemption

# Until the `try` at the bottom, a signal is only noted; raised there.
preemption.install_guard(defer=True)

from absl import app
from absl import flags

from trainer import errors
from trainer.cluster import STRATEGIES
from trainer.experiment import cli
from trainer.experiment import config_file

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              'configs', 'digits_mlp.py')

config_file.use_default_config(sys.argv, DEFAULT_CONFIG)
config_file.define_config_flag(DEFAULT_CONFIG)
flags.DEFINE_string('mode', 'train', f'One of: {", ".join(cli.MODES)}.')
flags.DEFINE_string('model_dir', None, 'Output directory (default: '
                    'runs/<config>[-<variant>]-<timestamp>).')
flags.DEFINE_string('strategy', 'default', f'One of: {", ".join(STRATEGIES)}.')
flags.DEFINE_string('worker_hosts', '', 'With --strategy=multi_worker_mirrored '
                    'and no TF_CONFIG: host:port of every worker, in order.')
flags.DEFINE_integer('task_index', None, "With --worker_hosts: this worker's "
                     'position in it, 0..N-1.')
flags.DEFINE_float('cluster_timeout', 300.0, 'With --strategy=multi_worker_'
                   'mirrored: seconds within which every worker must join the '
                   'cluster at start-up; otherwise exit 75 naming the missing '
                   'one (parameter_server: every worker and ps task must '
                   'serve). With config key data.service: seconds the tf.data '
                   'service dispatcher may not answer before exit 75.')
flags.DEFINE_string('tpu', '', 'With --strategy=tpu: a TPU name, '
                    'grpc://HOST:PORT, or "local" on a TPU VM.')
flags.DEFINE_float('tpu_timeout', 300.0, 'Seconds to wait for the TPU.')
flags.DEFINE_integer('num_cpu_devices', 1, 'Split the host CPU into N logical '
                     'devices (N replicas for --strategy=mirrored).')
flags.DEFINE_bool('deterministic', False, 'Seed everything and enable op '
                  'determinism: two runs give bitwise-identical checkpoints.')
flags.DEFINE_bool('print_config', False, 'Print the resolved config (every '
                  'framework key included) and exit.')
flags.DEFINE_integer('retryable_exit_code', None, 'Exit with this status on '
                     'a preemption (SIGTERM) and on a cluster failure, the '
                     'two a job manager should retry (default: 42 and 75); '
                     'e.g. 143 for a Kubeflow TFJob with restartPolicy: '
                     'ExitCode, which retries 128-255 only.')
flags.DEFINE_string('profile_steps', '', 'START,END: trace training steps '
                    'START..END for TensorBoard\'s profile plugin (written to '
                    'model_dir/train/plugins/profile).')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  try:
    request = cli.run_request(FLAGS)  # Flags and config, no TensorFlow yet.
  except errors.UserError as e:
    errors.fail(str(e))
  if FLAGS.print_config:
    print(request.config)
    return
  try:
    cli.check_model_dir(request.model_dir, request.mode, request.chief)
  except errors.UserError as e:
    errors.fail(str(e))
  try:
    from trainer.experiment import run  # pylint: disable=import-outside-toplevel
  except preemption.Preempted as e:  # While TensorFlow was being imported.
    preemption.exit_preempted(e, request.retryable_exit_code)
  run.main(request)


if __name__ == '__main__':
  try:
    preemption.stop_deferring()
    app.run(main, flags_parser=cli.parse_flags)
  except preemption.Preempted as e:  # Before run.main's own handling.
    preemption.exit_preempted(e, preemption.retryable_code_in(sys.argv))
