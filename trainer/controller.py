"""The outer loop: inner loops of `steps_per_loop` steps, and host work between.

Host work (checkpoints, evaluation, the best checkpoint, early stopping,
preemption, non-finite recovery, summaries, progress lines, profiling) runs
only between inner loops, which end on every checkpoint, eval and summary
boundary and run one step at a time inside a --profile_steps window.
"""

import contextlib
import dataclasses
import os
import time

from absl import logging
import tensorflow as tf

from trainer import actions as actions_lib
from trainer.persistence import best as best_lib
from trainer.persistence import preemption
from trainer.monitoring import goodput
from trainer.monitoring import profiling
from trainer.monitoring import progress
from trainer.monitoring import summaries
from trainer.errors import NonFiniteLoss, UserError
from trainer.parts import contracts
from trainer.parts import status as status_lib
from trainer.parts import streaming


@dataclasses.dataclass(frozen=True)
class ControllerOptions:
  """Cadences and policies of the outer loop (0 disables a cadence).

  Attributes:
    checkpoint_every: save every this many steps (and always at the end).
    eval_every: evaluate every this many steps (train_and_eval).
    eval_split: the split `evaluate` reads.
    best_metric: eval metric that picks the best checkpoint ('' for none).
    best_mode: 'max' or 'min' for best_metric.
    patience: stop after this many evals without a new best (0: never).
    nan_retries: on a non-finite step, restore the last checkpoint and
      continue with the data after the bad batch, at most this many times.
    summary_every: write training scalars every this many steps (loops are
      cut to end on it), at the end and before a preemption exit.
    log_every_secs: at most one progress line per N seconds (0: each loop).
    profile_steps: (START, END): steps profiled (monitoring/profiling.py).
    input_wait_every: time the input wait on one inner loop in this many
      (a few % of a small model's step time); 1: every loop; 0: never.
    data_service_job: with data.service, the run's job name (the same on
      every worker; the data position is appended).
  """
  checkpoint_every: int = 0
  eval_every: int = 0
  eval_split: str = 'test'
  best_metric: str = ''
  best_mode: str = 'max'
  patience: int = 0
  nan_retries: int = 0
  summary_every: int = 0
  log_every_secs: float = 0.0
  profile_steps: tuple[int, int] | None = None
  input_wait_every: int = 10
  data_service_job: str = 'distloop'


class Controller:
  """Drives a Trainer from the host.

  Args (keyword-only):
    trainer: a built Trainer.
    checkpointer: a persistence.checkpointing.Checkpointer, or None to save
      nothing.
    model_dir: where eval records and the best checkpoint go (None: nowhere).
    total_steps: train until trainer.global_step reaches this.
    steps_per_loop: steps per tf.function call.
    options: ControllerOptions.
    train_writer, eval_writer: summaries.MetricWriter for the training and
      evaluation scalars (None: write nothing).
    actions: the host actions (trainer/actions.py).
    ledger: a goodput.Ledger that the time of each part is added to (None:
      one kept in memory).
    clock: returns seconds; injected so tests control time.

  The scalars it writes (metrics/, optimizer/, throughput/) are listed in
  docs/monitoring.md#the-charts.
  """

  def __init__(self, *, trainer, checkpointer=None, model_dir=None,
               total_steps: int, steps_per_loop: int,
               options: ControllerOptions = ControllerOptions(),
               train_writer: summaries.MetricWriter | None = None,
               eval_writer: summaries.MetricWriter | None = None,
               actions: actions_lib.Actions | None = None,
               ledger: goodput.Ledger | None = None,
               clock=time.monotonic):
    self.trainer = trainer
    self.checkpointer = checkpointer
    self.model_dir = model_dir
    self.total_steps = total_steps
    self.steps_per_loop = steps_per_loop
    self.options = options
    self.clock = clock
    self.train_writer = train_writer or summaries.NullWriter()
    self.eval_writer = eval_writer or summaries.NullWriter()
    self.actions = actions or actions_lib.Actions([])
    self.ledger = ledger or goodput.Ledger()
    self.history, self.evals = [], []
    self._loops = 0  # Inner loops run by this controller.
    self.best = (best_lib.BestCheckpoint(
        os.path.join(model_dir, 'best'), metric=options.best_metric,
        mode=options.best_mode, patience=options.patience,
        read_from=checkpointer and os.path.join(
            checkpointer.restore_directory, 'best'))
                 if options.best_metric and model_dir else None)
    self._meter = progress.Meter(trainer.global_batch_size,
                                 trainer.metric_names)
    self.profile = None
    if options.profile_steps and model_dir:
      self.profile = profiling.ProfileWindow(
          *options.profile_steps, logdir=os.path.join(model_dir, 'train'))

  @property
  def step(self) -> int:
    return int(self.trainer.global_step.numpy())

  # Training ------------------------------------------------------------------

  def train(self) -> dict[str, float]:
    """Trains to total_steps; returns the last inner loop's metrics.

    Raises:
      preemption.Preempted: SIGTERM or SIGINT arrived; a checkpoint has
        been saved.
      NonFiniteLoss: a non-finite step and no retries left; nothing saved.
    """
    if self.step >= self.total_steps:
      logging.warning('already trained: step %d >= train.steps=%d in the '
                      'checkpoint; nothing to train', self.step,
                      self.total_steps)
      return {}
    if self.best and self.best.stopped_early(self.step):
      return {}
    trainer = self.trainer
    self._set_stop(0.0)
    # Start-up ends here; the step-0 save below is a checkpoint's time.
    self.ledger.begin_training(self.step)
    if (self.checkpointer and self.options.nan_retries and
        self.checkpointer.last_saved_step is None and self.step == 0):
      self._save()  # Something to recover to if the very first steps fail.
    if self.profile:
      self.profile.check_start(self.step, self.total_steps)
    iterator = self._iterator()
    metrics, retries = {}, 0
    self._meter.reset()
    progress_log = progress.ProgressLogger(
        total_steps=self.total_steps,
        global_batch_size=trainer.global_batch_size,
        main_metric=(trainer.metric_names or ('',))[0],
        every_secs=self.options.log_every_secs)
    try:
      with preemption.SignalWatcher(lambda: self._set_stop(1.0)) as watcher:
        logging.info('training from step %d to step %d (from here on, '
                     'SIGTERM or Ctrl-C stops after the step in flight)',
                     self.step, self.total_steps)
        stopped_early = self._missed_eval() and self.evaluate_and_track()
        while self.step < self.total_steps and not stopped_early:
          if status_lib.host_stops(watcher.requested, trainer.strategy):
            self._preempt(watcher.signum)
          metrics, seconds, untimed = self._train_loop(iterator)
          self.history.append((self.step, metrics))
          status = metrics.pop('status')
          if status == status_lib.NONFINITE:  # Its loop is not logged.
            self._meter.reset()  # Those steps are being rolled back.
            progress_log.meter.reset()
            retries += 1
            iterator = self._recover(retries, metrics.get('loss'))
            continue
          with self.ledger.timed('summaries'):
            progress_log.loop_done(self.step, metrics, seconds, self.clock(),
                                   untimed)
          self._meter.add(metrics, seconds, untimed)
          if (status == status_lib.STOP_REQUESTED or
              status_lib.host_stops(watcher.requested, trainer.strategy)):
            self._preempt(watcher.signum)
          if not metrics['steps']:
            continue  # All skipped (loss scale overflow): no boundary passed.
          if self._due(self.options.summary_every):
            self._write_train_summary()
          if self._due(self.options.checkpoint_every):
            self._save()
          self._run_actions('steps')
          if (self._due(self.options.eval_every) and
              self.step < self.total_steps):
            if self.evaluate_and_track():
              break
        if self.options.summary_every and self._meter.steps:
          self._write_train_summary()
        if self.checkpointer:
          if self.checkpointer.last_saved_step != self.step:
            self._save()
          with self.ledger.timed('checkpoints'):
            self.checkpointer.wait()  # A SIGTERM meanwhile: preempt below.
        if status_lib.any_worker(watcher.requested, trainer.strategy):
          self._preempt(watcher.signum)  # After the last step: saved, now preempt.
        self._run_actions('end')
        if status_lib.host_stops(watcher.requested, trainer.strategy):
          self._preempt(watcher.signum)  # During an at_end action.
    except BaseException:
      if self.checkpointer:
        # A failed run (a non-finite loss, an error) still finishes the
        # write in flight: main.py exits with os._exit, which would cut it.
        try:
          self.checkpointer.wait()
        except preemption.Preempted:
          pass  # The write is done; raised again at the next phase.
        except Exception as e:  # pylint: disable=broad-except
          logging.error('the last checkpoint write failed too: %s', e)
      raise
    finally:
      if self.profile:
        self.profile.stop()
      self.train_writer.flush()
      with contextlib.suppress(Exception):  # A lost ps task: raised below.
        self._set_stop(0.0)  # A later evaluate() runs to its end.
    with self.ledger.timed('input_teardown'):
      # TensorFlow can take seconds to delete a distributed iterator (0.2-6 s
      # measured under MirroredStrategy): counted, not left unaccounted.
      del iterator
    return metrics

  def _train_loop(self, iterator):
    """Runs one inner loop; returns (metrics, seconds, untimed): untimed
    when it traced or ran under the profiler, whose time is not step time."""
    trainer = self.trainer
    step = self.step
    num_steps = self._next_loop_length()
    every = self.options.input_wait_every
    timed = bool(every) and self._loops % every == min(1, every - 1)
    self._loops += 1
    traces = sum(trainer.trace_counts.values())
    profiled = bool(self.profile and self.profile.covers(step))
    with self.profile.step(step) if self.profile else contextlib.nullcontext():
      start = self.clock()
      try:
        metrics = trainer.train(iterator, num_steps, measure_input_wait=timed)
      except tf.errors.OutOfRangeError as e:
        # Validation catches a finite train split it can count; this is the
        # one whose length it could not know.
        raise UserError(
            f"{type(trainer).__name__}.dataset('train') ran out of data "
            f'after step {step} of {self.total_steps}: training reads the '
            'stream for train.steps steps; add .repeat() before .batch()'
            ) from e
      seconds = max(self.clock() - start, 1e-9)
    metrics['examples_per_sec'] = metrics['examples'] / seconds
    traced = sum(trainer.trace_counts.values()) != traces
    self.ledger.loop(step=self.step, steps=self.step - step, seconds=seconds,
                     traced=traced or profiled,
                     input_wait=metrics.get('input_wait_secs'),
                     loop_secs=metrics.get('loop_secs'))
    return metrics, seconds, traced or profiled

  def _write_train_summary(self):
    """Writes the training scalars of the steps since the last summary."""
    with self.ledger.timed('summaries'):
      values = self._meter.result()
      self._meter.reset()
      if not values:
        return
      trainer = self.trainer
      scalars = {f'metrics/{name}': values[name]
                 for name in ('loss', *trainer.metric_names) if name in values}
      train_metrics = {n[len('metrics/'):]: v for n, v in scalars.items()}
      train_metrics.update(streaming.results(trainer.streaming['train'],
                                             trainer.strategy))
      train_metrics.update(contracts.host_metrics(trainer, 'derived_metrics',
                                                  train_metrics))
      scalars.update({f'metrics/{n}': v for n, v in train_metrics.items()})
      scalars['optimizer/learning_rate'] = trainer.learning_rate()
      if 'grad_norm' in values:
        scalars['optimizer/grad_norm'] = values['grad_norm']
      scalars['optimizer/weight_norm'] = trainer.weight_norm()
      if trainer.loss_scale is not None:  # mixed_float16
        scalars['optimizer/loss_scale'] = float(trainer.loss_scale.numpy())
      for name in ('steps_per_sec', 'examples_per_sec', 'input_wait_share'):
        if name in values:
          scalars[f'throughput/{name}'] = values[name]
      self.ledger.write()  # goodput.json too, at the summaries' cadence.
      scalars.update(self.ledger.scalars(self.ledger.last_totals))
      self.train_writer.write_scalars(self.step, scalars)
      self.train_writer.flush()

  def _iterator(self):
    trainer = self.trainer
    dataset = trainer.distribute_dataset(
        'train', batch_size=trainer.global_batch_size,
        skip_batches=int(trainer.data_position.numpy()),
        service_job=self.options.data_service_job)
    return iter(dataset)

  def _next_loop_length(self) -> int:
    """steps_per_loop, cut to end on the next checkpoint/eval/summary
    boundary, and to one step inside the profile window."""
    step = self.step
    end = min(step + self.steps_per_loop, self.total_steps)
    for every in (self.options.checkpoint_every, self.options.eval_every,
                  self.options.summary_every, *self.actions.cadences):
      if every:
        end = min(end, (step // every + 1) * every)
    if self.profile:
      return self.profile.loop_length(step, end - step)
    return end - step

  def _missed_eval(self) -> bool:
    """Restored at an eval step with no record of its evaluation (SIGTERM or
    a crash stopped it): it runs first; in one process (workers could not
    agree on a file they read at different times)."""
    where = self.checkpointer and self.checkpointer.restore_directory
    missed = bool(self.step and where and self._due(self.options.eval_every)
                  and not status_lib.several_workers(self.trainer.strategy)
                  ) and not summaries.eval_recorded(where, self.step,
                                                    self.options.eval_split)
    if missed:
      logging.info('the evaluation at step %d did not finish before the '
                   'restart: evaluating it first', self.step)
    return missed

  def _due(self, every: int) -> bool:
    return bool(every) and self.step % every == 0

  def _save(self):
    if self.checkpointer:
      with self.ledger.timed('checkpoints'):
        self.checkpointer.save()

  def _set_stop(self, value: float):
    # 1 from the watcher thread, while an inner loop may be running.
    with self.trainer.strategy.scope():
      self.trainer.stop_requested.assign(value)

  def _preempt(self, signum):
    if self.options.summary_every and self._meter.steps:
      self._write_train_summary()  # At the checkpoint's step: no orphans.
    path = None
    if self.checkpointer:
      if self.checkpointer.last_saved_step != self.step:
        self._save()
      with self.ledger.timed('checkpoints'):
        self.checkpointer.wait()
      path = self.checkpointer.job_path(self.step)
    with contextlib.suppress(Exception):  # A ps task gone after the save.
      self._set_stop(1.0)  # Set by now in any case: their evaluations stop.
    self._run_actions('preemption')
    logging.info('%s', self.ledger.finish())
    raise preemption.Preempted(self.step, path, signum=signum or 0)

  def _run_actions(self, event: str, metrics=None):
    writer = self.eval_writer if event == 'eval' else self.train_writer
    with self.ledger.timed('summaries'):
      self.actions.run(event, actions_lib.Context(
          step=self.step, trainer=self.trainer, event=event, writer=writer,
          metrics=metrics, model_dir=self.model_dir))
      writer.flush()

  def _recover(self, retries: int, loss: float | None):
    """Restores the last checkpoint after a non-finite step, or gives up.
    `loss`: the failed loop's mean loss (finite: the gradient was not)."""
    failed_step, n = self.step + 1, self.options.nan_retries
    if retries > n or not self.checkpointer:
      raise NonFiniteLoss(status_lib.nonfinite_message(
          failed_step, loss, nan_retries=n, used_up=retries > n > 0,
          guarded=self.trainer.reports_grad_norm,
          clip_norm=self.trainer.clip_norm))
    computed, position = self.step, int(self.trainer.data_position.numpy())
    with self.ledger.timed('checkpoints'):
      self.checkpointer.wait()
      path = self.checkpointer.restore_latest()
    if path is None:
      raise NonFiniteLoss(f'non-finite loss at step {failed_step} and no '
                          'checkpoint to recover from')
    self.ledger.lose(computed - self.step)  # Computed again from here.
    streaming.clear(self.trainer.streaming['train'], self.trainer.strategy)
    # On after the failed batch (replaying it would fail the same way).
    self.trainer.data_position.assign(position)
    logging.warning('non-finite step %d: restored %s (step %d) and skipped '
                    'to data position %d (retry %d of %d)', failed_step, path,
                    self.step, position, retries, n)
    return self._iterator()

  # Evaluation ----------------------------------------------------------------

  def evaluate(self) -> dict[str, float]:
    """Evaluates the current weights on options.eval_split; records it."""
    split = self.options.eval_split
    with self.ledger.timed('eval'):
      metrics = self.trainer.evaluate(split)
    logging.info('eval %s at step %d: %s', split, self.step,
                 progress.format_metrics(metrics))
    self.evals.append((self.step, metrics))
    self.eval_writer.write_scalars(
        self.step, {f'metrics/{name}': value for name, value in
                    metrics.items() if name != 'examples'})
    self.eval_writer.flush()
    if self.model_dir:
      summaries.append_eval_record(
          self.model_dir, {'step': self.step, 'split': split, **metrics})
    self._run_actions('eval', metrics)
    return metrics

  def evaluate_and_track(self) -> bool:
    """Evaluates, keeps the best checkpoint; True when patience ran out."""
    try:
      metrics = self.evaluate()
    except preemption.EvalStopped:  # The caller preempts next.
      logging.warning('the evaluation at step %d was stopped before the end '
                      'of its split: not reported', self.step)
      return False
    if not self.best:
      return False
    return self.best.track(self.trainer, self.step, metrics)
