"""One experiment from checked flags and config: what main.py calls.

Order matters for the promise that bad input writes nothing: flags and the
config were checked before TensorFlow was imported (trainer/experiment/
cli.py, trainer/schema.py); here the strategy, the Trainer (batch sizes
against the replica count, the model) and then, before model_dir is
created, every split the mode reads and the traced steps
(trainer/experiment/validation.py).
"""

import contextlib
import dataclasses
import functools
import hashlib
import os
import shutil
import sys
import tempfile
import time

from absl import logging
import tensorflow as tf

import models  # noqa: F401  (registers the trainers)
from trainer import actions as actions_lib
from trainer import controller as controller_lib
from trainer import errors
from trainer import schema
from trainer.cluster import failures
from trainer.cluster import parameter_server
from trainer.cluster import service_watch
from trainer.cluster import strategies
from trainer.errors import UserError
from trainer.experiment import cli
from trainer.experiment import continuous_eval
from trainer.experiment import ending
from trainer.experiment import registry
from trainer.experiment import validation
from trainer.monitoring import goodput
from trainer.monitoring import progress
from trainer.monitoring import summaries
from trainer.parts import sharding
from trainer.persistence import best as best_lib
from trainer.persistence import checkpointing
from trainer.persistence import run_lock
from trainer.persistence import run_record
from trainer.persistence import preemption

MODES = cli.MODES


def main(request: cli.RunRequest) -> None:
  """Runs the request and exits with its status (see the README's table):
  0 done, 2 a bad flag/config/input (one line), 3 a non-finite loss, 42
  preempted, 75 a worker of the cluster failed, 130 Ctrl-C."""
  if request.serves:  # A worker or ps task of a parameter-server cluster.
    try:
      code = parameter_server.serve(request.retryable_exit_code or
                                    preemption.EXIT_CODE)
    except UserError as e:
      errors.fail(str(e))
    ending.exit_process(code, request)
  preemption.set_retryable_exit_code(request.retryable_exit_code)
  try:
    strategies.configure_cpu_devices(request.num_cpu_devices)
    metrics = run(
        request.config, model_dir=request.model_dir, mode=request.mode,
        strategy_name=request.strategy, tpu=request.tpu,
        tpu_timeout=request.tpu_timeout,
        num_cpu_devices=request.num_cpu_devices,
        cluster_timeout=request.cluster_timeout,
        deterministic=request.deterministic,
        profile_steps=request.profile_steps,
        failure_exit_code=(request.retryable_exit_code
                           or failures.ClusterError.EXIT_CODE),
        started=goodput.process_start_time())
  except UserError as e:
    errors.fail(str(e))
  except preemption.Preempted as e:
    code = e.exit_code(request.retryable_exit_code)
    logging.warning('%s (exit status %d)', e, code)
    ending.exit_process(code, request)
  except controller_lib.NonFiniteLoss as e:
    print(f'error: {e}', file=sys.stderr)
    ending.exit_process(controller_lib.NonFiniteLoss.EXIT_CODE, request)
  except Exception as e:  # pylint: disable=broad-except
    # A worker that did not join or died: a TF error wherever this one was.
    cluster_error = failures.cluster_error(e)
    if cluster_error is None:
      raise
    print(f'error: {cluster_error}', file=sys.stderr)
    sys.exit(request.retryable_exit_code or cluster_error.EXIT_CODE)
  export_path = metrics.pop('export', None)
  if export_path:
    print(f'exported: {export_path}')
  if metrics:
    print(f'final eval: {progress.format_metrics(metrics)}')
  ending.exit_process(0, request)


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


def controller_options(config, trainer) -> controller_lib.ControllerOptions:
  """The controller's cadences and policies from a resolved config."""
  best_metric, best_mode = best_lib.checked_eval_keys(
      config.eval, ('loss', *trainer.metric_names), type(trainer).__name__)
  return controller_lib.ControllerOptions(
      checkpoint_every=config.checkpoint.every_steps,
      eval_every=config.eval.every_steps,
      eval_split=config.eval.split,
      best_metric=best_metric,
      best_mode=best_mode,
      patience=config.eval.patience,
      nan_retries=config.train.nan_retries,
      summary_every=config.summary.every_steps,
      log_every_secs=config.log.every_secs,
      input_wait_every=config.summary.input_wait_every_loops)


def run(config, *, model_dir: str, strategy_name: str, mode: str = 'train',
        tpu: str = '', tpu_timeout: float = 300.0, num_cpu_devices: int = 1,
        deterministic: bool = False, profile_steps=None,
        cluster_timeout: float = 300.0,
        failure_exit_code: int = failures.ClusterError.EXIT_CODE,
        started: float | None = None):
  """Runs one experiment in `mode`; see MODES.

  Args:
    config: the experiment config, complete or partial (missing framework
      keys take their defaults, trainer/schema.py).
    profile_steps: (START, END) to trace training steps START..END into
      model_dir/train/plugins/profile (chief only), or None.
    cluster_timeout: multi-worker: seconds for every worker to join; with
      data.service: seconds the dispatcher may not answer.
    failure_exit_code: the status a lost tf.data service dispatcher ends the
      process with (service_watch).
    started: when the process started (Unix seconds), where goodput's
      start-up begins; None: now.

  Returns:
    The eval metrics (modes that evaluate), or {'export': path}.
  Raises:
    UserError: any bad flag, config value or Trainer method, before
      anything is written.
    preemption.Preempted: SIGTERM; a checkpoint was saved.
    controller.NonFiniteLoss: the loss diverged; nothing was saved after it.
    failures.ClusterError: a worker did not join the cluster in time (a
      worker that dies later surfaces as a TF error: failures.cluster_error).
  """
  started = time.time() if started is None else started
  errors.hide_coordinator_reports()
  if mode not in MODES:
    raise UserError(f'flag --mode={mode!r} is unknown; valid: '
                    f'{", ".join(MODES)}')
  config = schema.resolve(config)
  trainer_cls = registry.get(config.trainer)
  tf.keras.utils.set_random_seed(config.seed)
  if deterministic:
    tf.config.experimental.enable_op_determinism()
  strategy = strategies.build_strategy(
      strategy_name, tpu=tpu, tpu_timeout=tpu_timeout,
      num_cpu_devices=num_cpu_devices, cluster_timeout=cluster_timeout,
      variable_shard_bytes=config.train.variable_shard_bytes)
  layout = run_record.layout(strategy, config)
  if mode in ('train', 'train_and_eval'):
    run_record.check_layout(model_dir, layout, config.train.global_batch_size)
  trainer = validation.built(trainer_cls, config, strategy, train=mode in (
      'train', 'train_and_eval'))
  options = controller_options(config, trainer)
  # Only training reads through the service (evaluation reads its split
  # here), so only a training mode needs the dispatcher.
  use_service = bool(config.data.service) and mode in ('train',
                                                       'train_and_eval')
  if use_service:
    service_watch.check(config.data.service, deterministic=deterministic)
    # Named after --model_dir as given (not made absolute against each
    # worker's own working directory): every worker of the run reads one job.
    options = dataclasses.replace(options, data_service_job='distloop-' + (
        hashlib.sha1(model_dir.rstrip('/').encode()).hexdigest()[:12]))
  if mode != 'train_and_eval':  # Only it evaluates periodically.
    options = dataclasses.replace(options, eval_every=0)
  logging.info('%s on %d replica(s) (%s), global batch %d, mode %s',
               type(trainer).__name__, trainer.num_replicas,
               type(strategy).__name__, trainer.global_batch_size, mode)
  # Only the chief writes into model_dir. Other workers (multi-worker runs)
  # still take part in every save, as TensorFlow requires, but write into a
  # private temporary directory, removed when they finish (the watch too).
  is_chief = strategy.extended.should_checkpoint
  write_dir = model_dir if is_chief else tempfile.mkdtemp(
      prefix=f'distloop-worker{strategy.cluster_resolver.task_id}-')
  options = dataclasses.replace(
      options, profile_steps=profile_steps if is_chief else None)
  remove_private_dir = (lambda: None) if is_chief else functools.partial(
      shutil.rmtree, write_dir, ignore_errors=True)
  watch = use_service and service_watch.DispatcherWatch(
      config.data.service, timeout=cluster_timeout,
      exit_code=failure_exit_code, before_exit=remove_private_dir)
  try:
    return _run_mode(config, mode, trainer, options, model_dir=model_dir,
                     write_dir=write_dir, is_chief=is_chief,
                     strategy_name=strategy_name, started=started,
                     on_trained=watch.stop if watch else lambda: None)
  finally:
    if watch:
      watch.stop()
    remove_private_dir()
    run_lock.release(model_dir)


def _run_mode(config, mode, trainer, options, *, model_dir, write_dir,
              is_chief, strategy_name, started, on_trained):
  """run() once the trainer exists; writes go to write_dir only.

  `on_trained()` is called when training is over, before the final
  evaluation and export (which need no tf.data service).

  TensorBoard summaries are written by the chief only: by train and
  train_and_eval into model_dir (config and hparams), model_dir/train and
  model_dir/eval; by continuous_eval into model_dir/continuous_eval, so that
  an evaluator beside a training job never shares a directory with it.
  """
  checkpointer = checkpointing.Checkpointer(
      trainer, write_dir, restore_directory=model_dir,
      max_to_keep=config.checkpoint.max_to_keep if is_chief else 1,
      async_save=config.checkpoint.async_save and is_chief,
      tidy_leftovers=False)  # Only a training chief, locked (below).

  actions = actions_lib.Actions(
      actions_lib.built_in(config) + list(trainer.actions()),
      is_chief=is_chief)

  ledger = goodput.Ledger(model_dir if is_chief else None, start=started)

  def make_controller(train_writer=None, eval_writer=None):
    return controller_lib.Controller(
        trainer=trainer, checkpointer=checkpointer, model_dir=write_dir,
        total_steps=config.train.steps,
        steps_per_loop=config.train.steps_per_loop, options=options,
        train_writer=train_writer, eval_writer=eval_writer, actions=actions,
        ledger=ledger)
  record = dict(run_record.build(config, trainer),
                layout=run_record.layout(trainer.strategy, config),
                pieces=sharding.pieces(trainer.model),
                pieces_made_by=(
                    'train.variable_shard_bytes='
                    f'{config.train.variable_shard_bytes} with --strategy='
                    f'{strategy_name}'))

  if record['pieces']:
    logging.info('in pieces over the ps tasks (train.variable_shard_bytes='
                 '%d): %s', config.train.variable_shard_bytes, ', '.join(
                     f'{path} ({len(rows)})'
                     for path, rows in record['pieces'].items()))

  if mode == 'continuous_eval':
    preemption.set_phase('continuous evaluation')
    validation.check(trainer, train=False, eval_split=options.eval_split)
    with _writers([os.path.join(model_dir, 'continuous_eval')],
                  enabled=is_chief) as (eval_writer,):
      results = continuous_eval.run(
          make_controller(eval_writer=eval_writer), checkpointer,
          timeout_secs=config.eval.timeout_secs)
    if not results:
      raise UserError(f'--mode=continuous_eval found no checkpoint in '
                      f'--model_dir={model_dir} within eval.timeout_secs')
    return results[-1][1]

  if mode in ('eval', 'export'):
    if not os.path.isdir(model_dir):  # main.py refused it before TensorFlow.
      raise UserError(f'--mode={mode} needs a trained run in --model_dir, '
                      f'but {model_dir!r} does not exist')
    run_record.check_or_write(model_dir, record, write=False, reading=mode)
    preemption.set_phase('evaluation' if mode == 'eval' else 'export')
    validation.check(trainer, train=False, serving=mode == 'export',
                     eval_split=options.eval_split if mode == 'eval' else None)
    if checkpointer.restore_latest(model_only=True) is None:
      raise UserError(f'--mode={mode}: no checkpoint in --model_dir='
                      f'{model_dir}; train first (--mode=train)')
    if mode == 'eval':
      return make_controller().evaluate()
    return {'export': _export(trainer, write_dir)}

  # Check, restore, validate, and only then write: a refused resume, a
  # model_dir with no complete checkpoint or a Trainer whose data or step
  # fails must leave every file as it was (or no model_dir at all).
  run_record.check_or_write(model_dir, record, write=False)
  run_record.check_pieces(model_dir, record['pieces'],
                          record['pieces_made_by'])
  preemption.set_phase('restore')
  checkpointer.restore_latest()
  preemption.set_phase('validation (tracing the steps)')
  validation.check(trainer, train=True, eval_split=options.eval_split,
                   data_position=int(trainer.data_position.numpy()),
                   serving=config.export.at_end,
                   summaries=bool(options.summary_every))
  prepare_model_dir(model_dir)
  if is_chief:  # Alone in model_dir from here; readers never tidy it.
    run_lock.take(model_dir)
    checkpointing.tidy(model_dir, config.checkpoint.max_to_keep)
    run_record.check_or_write(model_dir, record)
    run_record.write_text_atomically(
        os.path.join(model_dir, 'config.json'),
        config.to_json_best_effort(indent=2, sort_keys=True))
  if not options.eval_every:  # train, or train_and_eval with every_steps=0.
    logging.info('one eval, at the end (periodic evals, eval.best_metric and '
                 'eval.patience: --mode=train_and_eval, eval.every_steps>0)')
  step = int(trainer.global_step.numpy())
  with _writers([model_dir, os.path.join(model_dir, 'train'),
                 os.path.join(model_dir, 'eval')], enabled=is_chief,
                resume_step=step) as (run_writer, train_writer, eval_writer):
    # At step 0, or at the step a resumed run starts from (its config may
    # differ: train.steps, the learning rate...).
    run_writer.write_texts(step, {'config': summaries.config_markdown(config)})
    run_writer.write_hparams(
        _hparams(config, trainer, strategy_name),
        trial_id=os.path.basename(os.path.normpath(model_dir)))
    run_writer.flush()
    controller = make_controller(train_writer, eval_writer)
    preemption.set_phase('training')
    controller.train()
    on_trained()
    preemption.set_phase('the final evaluation')
    if mode == 'train_and_eval':
      if not controller.evals or controller.evals[-1][0] != controller.step:
        controller.evaluate_and_track()  # Not again after an early stop.
      metrics = controller.evals[-1][1]
    else:
      metrics = controller.evaluate()
    if config.export.at_end:
      preemption.set_phase('export')
      with ledger.timed('export'):
        metrics['export'] = _export(trainer, write_dir)
    if ledger.step is not None:  # Not when there was nothing to train.
      # The final account (eval and export included), in the top-level run;
      # train/ has the account so far at each training summary.
      logging.info('%s', ledger.finish())
      run_writer.write_scalars(ledger.step,
                               ledger.scalars(ledger.last_totals))
  preemption.raise_pending()
  return metrics


def _hparams(config, trainer, strategy_name: str) -> dict:
  """Every config key, and how the run was distributed."""
  return dict(summaries.flatten(config.to_dict()), **{
      'run.strategy': strategy_name, 'run.num_replicas': trainer.num_replicas})


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


def _export(trainer, model_dir: str) -> str:
  from trainer.persistence import export  # pylint: disable=import-outside-toplevel
  with trainer.ema_weights():  # Serve the moving average when there is one.
    return export.export_saved_model(trainer,
                                     os.path.join(model_dir, 'export'))
