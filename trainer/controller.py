"""The outer loop: inner loops of `steps_per_loop` steps, and host work between.

Host work (checkpoints, evaluation, the best checkpoint, early stopping,
preemption, non-finite recovery, summaries, progress lines, profiling)
happens only between inner loops, never inside the tf.function. An inner loop
is cut short so that it ends exactly on every checkpoint, eval and summary
boundary, and runs one step at a time inside a --profile_steps window.
"""

import contextlib
import dataclasses
import json
import os
import time

from absl import logging

from trainer import checkpointing
from trainer import preemption
from trainer import profiling
from trainer import progress
from trainer import summaries
from trainer import trainer as trainer_lib


class NonFiniteLoss(Exception):
  """The loss or gradient norm was NaN/Inf and recovery is off or exhausted."""

  EXIT_CODE = 3


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
    summary_every: write training scalars every this many steps (need not
      divide steps_per_loop: loops are cut to end on it), at the end and
      before a preemption exit.
    log_every_secs: at most one progress line per this many seconds; 0 logs
      every inner loop.
    profile_steps: (START, END): trace steps START..END into
      model_dir/train/plugins/profile (see trainer/profiling.py); None: off.
    input_wait_every: measure the input wait on one inner loop in this many
      (the 2nd, then every this many): timing every step costs a few percent
      of step time on small models. 1: every loop; 0: never.
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


class Controller:
  """Drives a Trainer from the host.

  Args (keyword-only):
    trainer: a built Trainer.
    checkpointer: a checkpointing.Checkpointer, or None to save nothing.
    model_dir: where eval records and the best checkpoint go (None: nowhere).
    total_steps: train until trainer.global_step reaches this.
    steps_per_loop: steps per tf.function call.
    options: ControllerOptions.
    train_writer, eval_writer: summaries.MetricWriter for the training and
      evaluation scalars (None: write nothing).
    clock: returns seconds; injected so tests control time.

  Scalars, at global step s (tags; train and eval share the metric tags, so
  TensorBoard draws them in one chart):
    metrics/loss, metrics/<metric>  means over the examples since the last
        summary (train) or over the eval split (eval);
    optimizer/learning_rate         at step s;
    optimizer/grad_norm             mean over the steps since the last
        summary of the global norm of the all-reduced gradient (before
        clipping);
    optimizer/weight_norm           global L2 norm of the trainable weights;
    throughput/steps_per_sec, throughput/examples_per_sec (steps x global
        batch): over the time spent inside Trainer.train calls since the
        last summary, leaving out calls that traced or ran under the
        profiler (graph building and tracing are not step time);
    throughput/input_wait_share     the part of the inner loops' time they
        were blocked on the input pipeline, measured in the graph
        (trainer/trainer.py, _timed_next) on one inner loop in
        `input_wait_every`; written when such a loop ran since the last
        summary.
  """

  def __init__(self, *, trainer, checkpointer=None, model_dir=None,
               total_steps: int, steps_per_loop: int,
               options: ControllerOptions = ControllerOptions(),
               train_writer: summaries.MetricWriter | None = None,
               eval_writer: summaries.MetricWriter | None = None,
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
    self.history = []
    self._loops = 0  # Inner loops run by this controller.
    self.evals = []
    self._best_value = None
    self._evals_since_best = 0
    self._meter = progress.Meter(trainer.global_batch_size,
                                 trainer.metric_names)
    self.profile = None
    if options.profile_steps and model_dir:
      self.profile = profiling.ProfileWindow(
          *options.profile_steps, logdir=os.path.join(model_dir, 'train'))

  @property
  def step(self) -> int:
    return int(self.trainer.global_step.numpy())

  # ---------------------------------------------------------------------------
  # Training.

  def train(self) -> dict[str, float]:
    """Trains to total_steps; returns the last inner loop's metrics.

    Raises:
      preemption.Preempted: SIGTERM arrived; a checkpoint has been saved.
      NonFiniteLoss: a non-finite step and no retries left; nothing saved.
    """
    if self.step >= self.total_steps:
      logging.warning('already trained: step %d >= train.steps=%d in the '
                      'checkpoint; nothing to train', self.step,
                      self.total_steps)
      return {}
    trainer = self.trainer
    with trainer.strategy.scope():
      trainer.stop_requested.assign(0.0)
    if (self.checkpointer and self.options.nan_retries and
        self.checkpointer.last_saved_step is None and self.step == 0):
      self._save()  # Something to recover to if the very first steps fail.
    if self.profile and self.step >= self.profile.end:
      logging.warning('--profile_steps=%d,%d: the run starts at step %d, '
                      'after them; nothing is profiled', self.profile.start,
                      self.profile.end, self.step)
    iterator = self._iterator()
    metrics, retries = {}, 0
    self._meter.reset()
    progress_log = progress.ProgressLogger(
        total_steps=self.total_steps,
        global_batch_size=trainer.global_batch_size,
        main_metric=(trainer.metric_names or ('',))[0],
        every_secs=self.options.log_every_secs)
    try:
      with preemption.SigtermWatcher(self._request_stop) as watcher:
        while self.step < self.total_steps:
          if watcher.requested:
            self._preempt()
          metrics, seconds, untimed = self._train_loop(iterator)
          self.history.append((self.step, metrics))
          status = metrics.pop('status')
          progress_log.loop_done(self.step, metrics, seconds, self.clock(),
                                 untimed)
          if status == trainer_lib.NONFINITE:
            self._meter.reset()  # Those steps are being rolled back.
            retries += 1
            iterator = self._recover(retries)
            continue
          self._meter.add(metrics, seconds, untimed)
          if status == trainer_lib.STOP_REQUESTED or watcher.requested:
            self._preempt()
          if self._due(self.options.summary_every):
            self._write_train_summary()
          if self._due(self.options.checkpoint_every):
            self._save()
          if (self._due(self.options.eval_every) and
              self.step < self.total_steps):
            if self.evaluate_and_track():
              break
        if self.options.summary_every and self._meter.steps:
          self._write_train_summary()
        if self.checkpointer and self.checkpointer.last_saved_step != self.step:
          self._save()
    except BaseException:
      if self.checkpointer:
        # A failed run (a non-finite loss, an error) still finishes the
        # write in flight: main.py exits with os._exit, which would cut it.
        try:
          self.checkpointer.wait()
        except Exception as e:  # pylint: disable=broad-except
          logging.error('the last checkpoint write failed too: %s', e)
      raise
    finally:
      if self.profile:
        self.profile.stop()
      self.train_writer.flush()
    if self.checkpointer:
      self.checkpointer.wait()
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
      metrics = trainer.train(iterator, num_steps, measure_input_wait=timed)
      seconds = max(self.clock() - start, 1e-9)
    metrics['examples_per_sec'] = metrics['examples'] / seconds
    traced = sum(trainer.trace_counts.values()) != traces
    return metrics, seconds, traced or profiled

  def _write_train_summary(self):
    """Writes the training scalars of the steps since the last summary."""
    values = self._meter.result()
    self._meter.reset()
    if not values:
      return
    trainer = self.trainer
    scalars = {f'metrics/{name}': values[name]
               for name in ('loss', *trainer.metric_names) if name in values}
    scalars['optimizer/learning_rate'] = trainer.learning_rate()
    if 'grad_norm' in values:
      scalars['optimizer/grad_norm'] = values['grad_norm']
    scalars['optimizer/weight_norm'] = trainer.weight_norm()
    if trainer.loss_scale is not None:  # mixed_float16
      scalars['optimizer/loss_scale'] = float(trainer.loss_scale.numpy())
    for name in ('steps_per_sec', 'examples_per_sec', 'input_wait_share'):
      if name in values:
        scalars[f'throughput/{name}'] = values[name]
    self.train_writer.write_scalars(self.step, scalars)
    self.train_writer.flush()

  def _iterator(self):
    trainer = self.trainer
    dataset = trainer.distribute_dataset(
        'train', batch_size=trainer.global_batch_size,
        skip_batches=int(trainer.data_position.numpy()))
    return iter(dataset)

  def _next_loop_length(self) -> int:
    """steps_per_loop, cut to end on the next checkpoint/eval/summary
    boundary, and to one step inside the profile window."""
    step = self.step
    end = min(step + self.steps_per_loop, self.total_steps)
    for every in (self.options.checkpoint_every, self.options.eval_every,
                  self.options.summary_every):
      if every:
        end = min(end, (step // every + 1) * every)
    if self.profile:
      return self.profile.loop_length(step, end - step)
    return end - step

  def _due(self, every: int) -> bool:
    return bool(every) and self.step % every == 0

  def _save(self):
    if self.checkpointer:
      self.checkpointer.save()

  def _request_stop(self):
    # Called from the watcher thread while an inner loop may be running.
    with self.trainer.strategy.scope():
      self.trainer.stop_requested.assign(1.0)

  def _preempt(self):
    if self.options.summary_every and self._meter.steps:
      self._write_train_summary()  # At the checkpoint's step: no orphans.
    path = self.checkpointer.save() if self.checkpointer else '(no checkpoint)'
    if self.checkpointer:
      self.checkpointer.wait()
    raise preemption.Preempted(self.step, path)

  def _recover(self, retries: int):
    """Restores the last checkpoint after a non-finite step, or gives up."""
    trainer = self.trainer
    failed_step = self.step + 1
    position = int(trainer.data_position.numpy())
    if retries > self.options.nan_retries or not self.checkpointer:
      raise NonFiniteLoss(
          f'non-finite loss or gradient norm at step {failed_step}; the '
          'update was not applied and no checkpoint was written after it '
          f'(train.nan_retries={self.options.nan_retries}); lower the '
          'learning rate, enable train.clip_norm, or set train.nan_retries')
    self.checkpointer.wait()
    path = self.checkpointer.restore_latest()
    if path is None:
      raise NonFiniteLoss(f'non-finite loss at step {failed_step} and no '
                          'checkpoint to recover from')
    # Continue with the data after the batch that failed: replaying it would
    # fail the same way.
    trainer.data_position.assign(position)
    logging.warning('non-finite step %d: restored %s (step %d) and skipped '
                    'to data position %d (retry %d of %d)', failed_step, path,
                    self.step, position, retries, self.options.nan_retries)
    return self._iterator()

  # ---------------------------------------------------------------------------
  # Evaluation.

  def evaluate(self) -> dict[str, float]:
    """Evaluates the current weights on options.eval_split; records it."""
    split = self.options.eval_split
    metrics = self.trainer.evaluate(split)
    logging.info('eval %s at step %d: %s', split, self.step,
                 format_metrics(metrics))
    self.evals.append((self.step, metrics))
    self.eval_writer.write_scalars(
        self.step, {f'metrics/{name}': metrics[name]
                    for name in ('loss', *self.trainer.metric_names)})
    self.eval_writer.flush()
    if self.model_dir:
      record = {'step': self.step, 'split': split, **metrics}
      os.makedirs(os.path.join(self.model_dir, 'eval'), exist_ok=True)
      with open(os.path.join(self.model_dir, 'eval', 'metrics.jsonl'),
                'a') as f:
        f.write(json.dumps(record) + '\n')
    return metrics

  def evaluate_and_track(self) -> bool:
    """Evaluates, keeps the best checkpoint; True when patience ran out."""
    metrics = self.evaluate()
    name = self.options.best_metric
    if not name or not self.model_dir:
      return False
    value = metrics[name]
    better = (self._best_value is None or
              (value > self._best_value if self.options.best_mode == 'max'
               else value < self._best_value))
    if better:
      self._best_value, self._evals_since_best = value, 0
      self._save_best(name, value)
      return False
    self._evals_since_best += 1
    if self.options.patience and self._evals_since_best >= self.options.patience:
      logging.warning('early stop at step %d: %s has not improved on %.6g for '
                      '%d evals (eval.patience)', self.step, name,
                      self._best_value, self._evals_since_best)
      return True
    return False

  def _save_best(self, name: str, value: float):
    """Writes best/ckpt-<step> then best/record.json (atomically, after)."""
    best_dir = os.path.join(self.model_dir, 'best')
    manager = checkpointing.Checkpointer(self.trainer, best_dir, max_to_keep=1,
                                         async_save=False)
    path = manager.save()
    checkpointing.write_json_atomically(
        os.path.join(best_dir, 'record.json'),
        {'metric': name, 'mode': self.options.best_mode, 'value': value,
         'step': self.step, 'checkpoint': os.path.basename(path)})


def format_metrics(metrics: dict[str, float]) -> str:
  """'accuracy=0.973 loss=0.091': sorted key=value pairs, counts as ints."""
  parts = []
  for key in sorted(metrics):
    value = metrics[key]
    if key in ('examples', 'steps'):
      parts.append(f'{key}={int(value)}')
    elif key.endswith('_per_sec'):
      parts.append(f'{key}={value:.0f}')
    else:
      parts.append(f'{key}={value:.4g}')
  return ' '.join(parts)
