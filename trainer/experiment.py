"""One experiment from resolved flags and config: what main.py calls.

Order matters for the promise that bad input writes nothing: every check
(config keys, strategy, batch sizes, model, data) runs before model_dir is
created.
"""

import contextlib
import dataclasses
import datetime
import os
import shutil
import tempfile

from absl import logging
import tensorflow as tf

import models  # noqa: F401  (registers the trainers)
from trainer import checkpointing
from trainer import continuous_eval
from trainer import controller as controller_lib
from trainer import registry
from trainer import strategies
from trainer import summaries
from trainer.errors import UserError

MODES = ('train', 'eval', 'train_and_eval', 'continuous_eval', 'export')
REQUIRED_KEYS = ('trainer', 'seed', 'train.steps', 'train.global_batch_size',
                 'train.steps_per_loop', 'optimizer.name',
                 'optimizer.learning_rate', 'eval.global_batch_size')


def check_config(config) -> None:
  """Raises UserError for a missing required key or a non-positive count."""
  for key in REQUIRED_KEYS:
    node = config
    for part in key.split('.'):
      if part not in node:
        raise UserError(f'config key {key} is missing; every config needs '
                        f'{", ".join(REQUIRED_KEYS)}')
      node = node[part]
  for key in ('steps', 'global_batch_size', 'steps_per_loop'):
    value = config.train[key]
    if not isinstance(value, int) or value < 1:
      raise UserError(f'config key train.{key}={value!r} must be an integer '
                      '>= 1')


def default_model_dir(config_path: str) -> str:
  """runs/<config name>-<variant>-<timestamp>, relative to the working dir."""
  name = os.path.basename(config_path).replace('.py', '').replace(':', '-')
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  return os.path.join('runs', f'{name}-{stamp}')


def prepare_model_dir(model_dir: str) -> None:
  """Creates model_dir, or raises a UserError naming --model_dir."""
  try:
    os.makedirs(model_dir, exist_ok=True)
    # A per-process name: several workers may probe the same directory.
    fd, probe = tempfile.mkstemp(prefix='.write_probe', dir=model_dir)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise UserError(f'flag --model_dir={model_dir!r} is not a writable '
                    f'directory ({e.strerror}); pass a directory you can '
                    'write to') from e


def build_trainer(config, strategy):
  """Returns the configured Trainer subclass built under `strategy`."""
  trainer_cls = registry.get(config.trainer)
  return trainer_cls(config=config, strategy=strategy)


def controller_options(config, trainer) -> controller_lib.ControllerOptions:
  """Reads the optional cadence/policy keys (defaults when absent)."""
  ckpt = config.get('checkpoint', {})
  evals = config.get('eval', {})
  summary = config.get('summary', {})
  log = config.get('log', {})
  options = controller_lib.ControllerOptions(
      checkpoint_every=ckpt.get('every_steps', 0),
      eval_every=evals.get('every_steps', 0),
      eval_split=evals.get('split', 'test'),
      best_metric=evals.get('best_metric', ''),
      best_mode=evals.get('best_mode', 'max'),
      patience=evals.get('patience', 0),
      nan_retries=config.train.get('nan_retries', 0),
      summary_every=summary.get('every_steps', config.train.steps_per_loop),
      log_every_secs=log.get('every_secs', 0.0),
      input_wait_every=summary.get('input_wait_every_loops', 10))
  for key, value in (('checkpoint.every_steps', options.checkpoint_every),
                     ('eval.every_steps', options.eval_every),
                     ('eval.patience', options.patience),
                     ('train.nan_retries', options.nan_retries),
                     ('summary.every_steps', options.summary_every),
                     ('summary.input_wait_every_loops',
                      options.input_wait_every)):
    if not isinstance(value, int) or value < 0:
      raise UserError(f'config key {key}={value!r} must be an integer >= 0 '
                      '(0 disables it)')
  every_secs = options.log_every_secs
  if (isinstance(every_secs, bool) or not isinstance(every_secs, (int, float))
      or not every_secs >= 0):
    raise UserError(f'config key log.every_secs={every_secs!r} must be a '
                    'number of seconds >= 0 (0 logs every inner loop)')
  metrics = ('loss', *trainer.metric_names)
  if options.best_metric and options.best_metric not in metrics:
    raise UserError(f'config key eval.best_metric={options.best_metric!r} is '
                    f'not an eval metric; valid: {", ".join(metrics)} or "" '
                    'to keep no best checkpoint')
  if options.best_mode not in ('max', 'min'):
    raise UserError(f'config key eval.best_mode={options.best_mode!r} must be '
                    '"max" or "min"')
  if options.eval_split == 'train':
    # Trainer.dataset('train') repeats forever: an eval would never end.
    raise UserError("config key eval.split='train' is the endless training "
                    'stream and cannot be evaluated once; evaluate a held-out '
                    "split, e.g. --config.eval.split=test")
  return options


def run(config, *, model_dir: str, strategy_name: str, mode: str = 'train',
        tpu: str = '', tpu_timeout: float = 300.0, num_cpu_devices: int = 1,
        deterministic: bool = False, profile_steps=None,
        cluster_timeout: float = 300.0):
  """Runs one experiment in `mode`; see MODES.

  Args:
    profile_steps: (START, END) to trace training steps START..END into
      model_dir/train/plugins/profile (chief only), or None.
    cluster_timeout: multi-worker: seconds for every worker to join.

  Returns:
    The eval metrics (modes that evaluate), or {'export': path}.
  Raises:
    UserError: any bad flag or config value, before anything is written.
    preemption.Preempted: SIGTERM; a checkpoint was saved.
    controller.NonFiniteLoss: the loss diverged; nothing was saved after it.
    strategies.ClusterError: a worker did not join the cluster in time (a
      worker that dies later surfaces as a TF error: strategies.cluster_error).
  """
  if mode not in MODES:
    raise UserError(f'flag --mode={mode!r} is unknown; valid: '
                    f'{", ".join(MODES)}')
  check_config(config)
  tf.keras.utils.set_random_seed(config.seed)
  if deterministic:
    tf.config.experimental.enable_op_determinism()
  strategy = strategies.build_strategy(strategy_name, tpu=tpu,
                                       tpu_timeout=tpu_timeout,
                                       num_cpu_devices=num_cpu_devices,
                                       cluster_timeout=cluster_timeout)
  trainer = build_trainer(config, strategy)
  options = controller_options(config, trainer)
  if mode != 'train_and_eval':  # Only train_and_eval evaluates periodically.
    options = dataclasses.replace(options, eval_every=0)
  logging.info('%s on %d replica(s) (%s), global batch %d, mode %s',
               type(trainer).__name__, trainer.num_replicas,
               type(strategy).__name__, trainer.global_batch_size, mode)
  # Only the chief writes into model_dir. Other workers (multi-worker runs)
  # still take part in every save, as TensorFlow requires, but write into a
  # private temporary directory that is removed when they finish.
  is_chief = strategy.extended.should_checkpoint
  write_dir = model_dir if is_chief else tempfile.mkdtemp(
      prefix=f'distloop-worker{strategy.cluster_resolver.task_id}-')
  options = dataclasses.replace(
      options, profile_steps=profile_steps if is_chief else None)
  try:
    return _run_mode(config, mode, trainer, options, model_dir=model_dir,
                     write_dir=write_dir, is_chief=is_chief)
  finally:
    if not is_chief:
      shutil.rmtree(write_dir, ignore_errors=True)


def _run_mode(config, mode, trainer, options, *, model_dir, write_dir,
              is_chief):
  """run() once the trainer exists; writes go to write_dir only.

  TensorBoard summaries are written by the chief only: by train and
  train_and_eval into model_dir (config and hparams), model_dir/train and
  model_dir/eval; by continuous_eval into model_dir/continuous_eval, so that
  an evaluator beside a training job never shares a directory with it.
  """
  ckpt = config.get('checkpoint', {})
  checkpointer = checkpointing.Checkpointer(
      trainer, write_dir, restore_directory=model_dir,
      max_to_keep=ckpt.get('max_to_keep', 3) if is_chief else 1,
      async_save=ckpt.get('async_save', True) and is_chief)

  def make_controller(train_writer=None, eval_writer=None):
    return controller_lib.Controller(
        trainer=trainer, checkpointer=checkpointer, model_dir=write_dir,
        total_steps=config.train.steps,
        steps_per_loop=config.train.steps_per_loop, options=options,
        train_writer=train_writer, eval_writer=eval_writer)
  record = checkpointing.run_record(config, trainer)

  if mode == 'continuous_eval':
    with _writers([os.path.join(model_dir, 'continuous_eval')],
                  enabled=is_chief) as (eval_writer,):
      results = continuous_eval.run(
          make_controller(eval_writer=eval_writer), checkpointer,
          timeout_secs=config.get('eval', {}).get('timeout_secs', 600))
    if not results:
      raise UserError(f'--mode=continuous_eval found no checkpoint in '
                      f'--model_dir={model_dir} within eval.timeout_secs')
    return results[-1][1]

  if mode in ('eval', 'export'):
    if not os.path.isdir(model_dir):
      raise UserError(f'--mode={mode} needs a trained run in --model_dir, '
                      f'but {model_dir!r} does not exist')
    checkpointing.check_or_write_run_record(model_dir, record, write=False)
    if checkpointer.restore_latest(model_only=True) is None:
      raise UserError(f'--mode={mode}: no checkpoint in --model_dir='
                      f'{model_dir}; train first (--mode=train)')
    if mode == 'eval':
      return make_controller().evaluate()
    return {'export': _export(trainer, write_dir)}

  prepare_model_dir(model_dir)
  # Check, restore, and only then write: a refused resume or a model_dir
  # with no complete checkpoint must leave every file as it was.
  checkpointing.check_or_write_run_record(model_dir, record, write=False)
  checkpointer.restore_latest()
  if is_chief:
    checkpointing.check_or_write_run_record(model_dir, record)
    checkpointing.write_text_atomically(
        os.path.join(model_dir, 'config.json'),
        config.to_json_best_effort(indent=2, sort_keys=True))
  if mode == 'train_and_eval' and not options.eval_every:
    logging.info('train_and_eval with eval.every_steps=0: one eval at the end')
  step = int(trainer.global_step.numpy())
  with _writers([model_dir, os.path.join(model_dir, 'train'),
                 os.path.join(model_dir, 'eval')], enabled=is_chief,
                resume_step=step) as (run_writer, train_writer, eval_writer):
    # At step 0, or at the step a resumed run starts from (its config may
    # differ: train.steps, the learning rate...).
    run_writer.write_texts(step, {'config': _config_markdown(config)})
    run_writer.write_hparams(summaries.flatten(config.to_dict()))
    run_writer.flush()
    controller = make_controller(train_writer, eval_writer)
    controller.train()
    if mode == 'train_and_eval':
      controller.evaluate_and_track()
      metrics = controller.evals[-1][1]
    else:
      metrics = controller.evaluate()
  if config.get('export', {}).get('at_end', False):
    metrics['export'] = _export(trainer, write_dir)
  return metrics


@contextlib.contextmanager
def _writers(directories, *, enabled: bool, resume_step=None):
  """One TensorBoardWriter per directory (NullWriters when not enabled),
  closed on exit."""
  if enabled:
    logging.info('TensorBoard summaries in %s', ', '.join(directories))
  else:
    logging.info('not the chief: this worker writes no TensorBoard summaries')
  writers = [summaries.TensorBoardWriter(d, resume_step=resume_step)
             if enabled else summaries.NullWriter() for d in directories]
  try:
    yield writers
  finally:
    for writer in writers:
      writer.close()


def _config_markdown(config) -> str:
  """The resolved config as a markdown code block (TensorBoard's Text tab)."""
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  return '\n'.join('    ' + line for line in text.splitlines())


def _export(trainer, model_dir: str) -> str:
  from trainer import export  # pylint: disable=import-outside-toplevel
  with trainer.ema_weights():  # Serve the moving average when there is one.
    return export.export_saved_model(trainer,
                                     os.path.join(model_dir, 'export'))
