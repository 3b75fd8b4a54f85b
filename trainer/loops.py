"""The inner loops: many replica steps in one tf.function call.

`train_loop` runs up to `num_steps` steps of `strategy.run(step)` in a
tf.while_loop; the outer Python loop (trainer/controller.py) calls it once
per `train.steps_per_loop` steps and does the host work in between.
`num_steps` is a tensor and the iterator an argument, so nothing retraces.
`eval_loop` runs over a whole (finite) split.

Around each replica step (`replica_step`) the loop adds what is not
model-specific: the replica's own random numbers (parts/randomness.py), the
contract check of what the step returned (parts/contracts.py), the metric
sums (parts/metric_sums.py) and the step status (parts/status.py).
"""

import functools

import numpy as np
import tensorflow as tf

from trainer import step as step_lib
from trainer.persistence import preemption
from trainer.parts import autograph
from trainer.parts import contracts
from trainer.parts import input_wait
from trainer.parts import precision
from trainer.parts import randomness
from trainer.parts import replica_copies
from trainer.parts import status as status_lib
from trainer.parts import streaming

# The key under which an eval step returns what Trainer.eval_outputs gives.
EVAL_OUTPUTS = 'outputs'


@autograph.framework
def replica_step(trainer, step_fn, sums, *, train: bool):
  """Wraps a replica step (train_step or eval_step) for strategy.run.

  The wrapped step adds its per-example values into `sums` (and, for
  training, the step's global gradient norm when the step was applied: the
  same on every replica, so `train` divides the sum by the replica count) and
  returns the step status, an int32 scalar equal on every replica.
  """
  name = f'{type(trainer).__name__}.{step_fn.__name__}'
  owner = next((c for c in type(trainer).__mro__
                if vars(c).get(step_fn.__name__) is getattr(
                    step_fn, '__func__', step_fn)), None)
  # The default step's keys are 'loss' and those of compute_metrics.
  keys_from = (f'{type(trainer).__name__}.compute_metrics'
               if getattr(owner, '__module__', '') == 'trainer.trainer' else
               name)

  @autograph.framework
  def step(batch):
    with step_lib.recording() as record, randomness.per_replica():
      values = autograph.user(step_fn)(batch)
    gathered = values.pop(EVAL_OUTPUTS, None) if not train else None
    gathering = not train and gathers_eval_outputs(trainer)
    if gathered is not None:
      gathered = contracts.gathered_outputs(
          gathered, where=f'{type(trainer).__name__}.eval_outputs',
          size=contracts.batch_size(batch))
    values = contracts.step_outputs(values, where=name, keys_from=keys_from,
                                    names=trainer.metric_names,
                                    size=contracts.batch_size(batch))
    loss = values['loss'][0]
    status = record.status
    if status is None and train and trainer.loss_scaling is not None:
      raise contracts.ContractError(
          f'{name} bypasses self.apply_gradients, which under '
          "train.precision='mixed_float16' skips the steps whose gradients "
          'overflow float16 and adjusts the loss scale: call it, or set '
          "train.precision='mixed_bfloat16' (no loss scaling needed)")
    if status is None and train and trainer.clip_norm > 0:
      raise contracts.ContractError(
          f'{name} bypasses self.apply_gradients, which clips the gradients '
          f'to train.clip_norm={trainer.clip_norm:g}: call it, or set '
          'train.clip_norm=0 and clip in your step')
    if status is None and train and not trainer.coordinated:
      # A train_step that bypassed apply_gradients: one all-reduce of the
      # finiteness of its loss and of the weights it updated, and of the
      # stop request, so that no replica or worker stops (or goes on) alone.
      # (Parameter-server workers step asynchronously: each decides for
      # itself.)
      status = status_lib.reduced(loss, trainer.stop_requested,
                                  trainer.trainable_variables)
    elif status is None:
      status = status_lib.local(loss, trainer.stop_requested)
    extras = {}
    if train:
      trainer.reports_grad_norm = record.grad_norm is not None
      norm = record.grad_norm if record.grad_norm is not None else 0.0
      # A skipped step (NaN, overflow) is left out of the reported norm.
      applied = (record.applied if record.applied is not None else
                 status_lib.applied(status))
      extras['grad_norm'] = tf.where(applied, norm, 0.0)
    sums.add(values, examples=tf.shape(loss)[0], **extras)
    # eval_outputs may return None: nothing gathered from this batch.
    return (status, gathered or {}) if gathering else status
  if train or not skips_empty_eval_batches(trainer):
    return step

  @autograph.framework
  def eval_step(batch):
    # The last, partial global batch of a split can leave a replica with
    # no example. That adds nothing, so it does not run: TensorFlow 2.21's
    # oneDNN conv2d gives an empty batch its input's shape on some CPUs
    # (AMX), and the next layer fails.
    size = contracts.batch_size(batch)
    if isinstance(size, int):
      return step(batch)
    return tf.cond(size > 0, lambda: step(batch),
                   lambda: tf.constant(status_lib.OK))
  return eval_step


def skips_empty_eval_batches(trainer) -> bool:
  """Whether an eval step on an empty replica batch is skipped: with the
  built-in eval_step (an override may call a collective, which every
  replica must reach) and no eval outputs to gather."""
  return (getattr(type(trainer).eval_step, 'is_default', False) and
          not gathers_eval_outputs(trainer))


def train_loop(trainer, iterator, num_steps, *, timed: bool):
  """Up to num_steps train steps; ends early after a step that was not OK.

  Returns (sums, applied steps, last status, input wait secs, loop secs),
  the last two 0 unless `timed`.
  """
  strategy = trainer.strategy
  step_fn = replica_step(trainer, trainer.train_step, trainer.train_sums,
                         train=True)
  scaling, ema = trainer.loss_scaling, trainer.ema
  skipped_before = scaling.skipped.read_value() if scaling else None
  start = tf.timestamp() if timed else None

  # A plain tf.while_loop whose condition ends the loop after a step that
  # was not OK (or OVERFLOW). Its only loop variables are the step index,
  # the last status and the input wait: every loop variable costs a few
  # executor ops per step, and an AutoGraph `for ... break` adds a cond and
  # more loop variables (~1-2% of the seed MLP's 0.3 ms step).
  def keep_going(i, status, *unused_waited):
    return (i < num_steps) & status_lib.continues(
        status, overflow=scaling is not None)

  def body(i, unused_status, *waited):
    if timed:
      batch, wait = input_wait.timed_next(iterator)
      waited = (waited[0] + wait,)
    else:
      batch = next(iterator)
    status = strategy.experimental_local_results(
        strategy.run(step_fn, args=(batch,)))[0]
    if scaling is not None:
      scaling.update(status)
    if ema is not None:
      # Updates before this one: the applied steps of earlier loops and of
      # this loop so far (overflow steps were not applied).
      done = trainer.global_step + tf.cast(i, tf.int64)
      if scaling is not None:
        done -= scaling.skipped - skipped_before
      ema.update(status_lib.applied(status), done)
    return (i + 1, status, *waited)

  initial = (tf.zeros([], num_steps.dtype), tf.constant(status_lib.OK))
  if timed:
    initial += (tf.constant(0.0, tf.float64),)  # Seconds getting batches.
  final = tf.while_loop(keep_going, body, initial)
  # Batches taken from the stream, and updates applied: all of them but a
  # last NONFINITE step's and the overflow steps'.
  taken, status = tf.cast(final[0], tf.int64), final[1]
  applied = taken - tf.cast(status == status_lib.NONFINITE, tf.int64)
  if scaling is not None:
    applied -= scaling.skipped - skipped_before
  waited = elapsed = tf.constant(0.0, tf.float64)
  if timed:
    waited = final[2]
    with tf.control_dependencies([status, waited]):
      elapsed = tf.timestamp() - start
  trainer.global_step.assign_add(applied)
  trainer.data_position.assign_add(taken)
  return (trainer.train_sums.reduce_and_reset(strategy), applied, status,
          waited, elapsed)


def eval_batch(trainer, batch):
  """One eval batch: adds its sums, returns its eval outputs gathered from
  every replica and worker ({name: [examples of this batch, ...]})."""
  step_fn = replica_step(trainer, trainer.eval_step, trainer.eval_sums,
                         train=False)
  _, outputs = trainer.strategy.run(step_fn, args=(batch,))
  return tf.nest.map_structure(
      lambda x: trainer.strategy.gather(x, axis=0), outputs)


def eval_loop(trainer, iterator):
  """(sums of the eval step's values over every batch of `iterator`,
  whether a stop request ended it early).

  In one process the loop leaves after the batch in flight once the host
  sets `stop_requested` (a SIGTERM during a periodic evaluation: the run
  saves and exits instead of finishing a long evaluation first). Several
  workers finish it: one leaving alone would leave the others waiting.
  """
  step_fn = replica_step(trainer, trainer.eval_step, trainer.eval_sums,
                         train=False)
  stoppable = not status_lib.several_workers(trainer.strategy)
  stopped = tf.constant(False)
  for batch in iterator:
    trainer.strategy.run(step_fn, args=(batch,))
    if stoppable and trainer.stop_requested > 0:
      stopped = tf.constant(True)
      break
  return trainer.eval_sums.reduce_and_reset(trainer.strategy), stopped


# -----------------------------------------------------------------------------
# Called from the host (Trainer.train / Trainer.evaluate).


def train(trainer, iterator, num_steps: int, *,
          measure_input_wait: bool = False) -> dict[str, float]:
  """Runs up to `num_steps` steps in one call of the traced train loop.

  The loop ends early, after the step in flight, when the host sets
  `stop_requested` or a step's loss or gradient norm is not finite (that
  step's update is skipped).

  Args:
    trainer: the Trainer.
    iterator: an iterator over `distribute_dataset('train', ...)`.
    num_steps: steps to run; passed as a tensor so no value retraces.
    measure_input_wait: time every step's wait for its batch
      (parts/input_wait.py). That costs a few percent of step time on small
      models, so the controller measures one inner loop in several; it runs
      a second graph of the loop, traced on its first use. Ignored under op
      determinism (--deterministic), where tf.timestamp is refused.
  Returns:
    {'loss': mean per-example loss, metric: mean, 'examples': count,
     'weights': {name: sum of its weights (the count when unweighted)},
     'steps': updates applied, 'status': parts.status value, 'grad_norm':
     mean over the applied steps of the global norm of the all-reduced
     gradient (absent when the train step does not call `apply_gradients`)},
    means over the examples of all replicas in these steps; with the input
    wait measured also 'input_wait_secs', the seconds the loop was blocked
    taking batches from `iterator`, and 'loop_secs', the seconds from the
    loop's start to its end measured by the same clock inside the graph (so
    tracing is not counted).
  """
  if getattr(trainer, 'coordinated', None):  # --strategy=parameter_server.
    return trainer.coordinated.train(iterator, num_steps)
  build_streaming(trainer)
  timed = measure_input_wait and trainer.measures_input_wait
  loop = trainer._train_loop_timed if timed else trainer._train_loop  # pylint: disable=protected-access
  sums, steps, status, waited, elapsed = loop(
      iterator, tf.constant(num_steps, tf.int32))
  sums = sums.numpy()
  metrics = trainer.train_sums.means(sums)
  metrics['weights'] = trainer.train_sums.weights(sums)
  norm = metrics.pop('grad_norm')
  metrics['steps'] = int(steps)
  metrics['status'] = int(status)
  if timed:
    metrics['input_wait_secs'] = float(waited)
    metrics['loop_secs'] = float(elapsed)
  if trainer.reports_grad_norm and int(steps):
    # Every replica added the same norm of each applied step.
    metrics['grad_norm'] = norm / (trainer.num_replicas * int(steps))
  return metrics


def evaluate(trainer, split: str) -> dict[str, float]:
  """Loss and metrics over the whole of `split`, each example once (with
  the moving-average weights when train.ema_decay is set).

  Raises:
    preemption.EvalStopped: a stop request (a SIGTERM or Ctrl-C while the
      Controller trains, in one process) ended it before the end of the
      split; nothing of it is returned.
  """
  # pylint: disable=protected-access
  dataset = trainer.distribute_dataset(
      split, batch_size=trainer.eval_global_batch_size)
  build_streaming(trainer)
  if trainer._equalize_copies and replica_copies.drifting(trainer.model):
    trainer._equalize_copies()  # Replica 0's moving statistics everywhere.
  streaming.results(trainer.streaming['eval'], trainer.strategy)  # Reset.
  aggregated, parts = {}, None
  with trainer.ema_weights():
    if gathers_eval_outputs(trainer):
      # Batch by batch from the host: each batch's outputs, gathered from
      # every replica (an empty or short replica batch adds what it has),
      # are appended, so every example counts exactly once.
      step = eval_batch_fn(trainer, dataset.element_spec)
      parts, stopped = [], False
      for batch in dataset:
        parts.append(tf.nest.map_structure(lambda x: x.numpy(), step(batch)))
        if (not status_lib.several_workers(trainer.strategy) and
            trainer.stop_requested.numpy() > 0):
          stopped = True
          break
      sums = trainer._eval_sums()
    else:
      sums, stopped = trainer._eval_loop(iter(dataset))
    if stopped:  # Before aggregate, which would see part of the split.
      raise preemption.EvalStopped(f'the evaluation of {split!r} was stopped')
    if parts is not None:
      outputs = {name: np.concatenate([p[name] for p in parts])
                 for name in (parts[0] if parts else {})}
      aggregated = contracts.host_metrics(trainer, 'aggregate', outputs)
    metrics = trainer.eval_sums.means(sums.numpy())
    metrics.update(streaming.results(trainer.streaming['eval'],
                                     trainer.strategy))
  metrics.update(aggregated)
  metrics.update(contracts.host_metrics(trainer, 'derived_metrics', metrics))
  return metrics


def gathers_eval_outputs(trainer) -> bool:
  """Whether the Trainer overrides eval_outputs."""
  return not getattr(type(trainer).eval_outputs, 'is_default', False)


def eval_batch_fn(trainer, element_spec):
  """The traced one-batch eval step for batches of `element_spec`
  (evaluations that gather outputs run batch by batch from the host)."""
  # pylint: disable=protected-access
  key = repr(element_spec)
  if key not in trainer.eval_batch_fns:
    trainer.eval_batch_fns[key] = trainer._traces.function(
        functools.partial(eval_batch, trainer),
        f'eval_batch_{len(trainer.eval_batch_fns)}',
        input_signature=[element_spec])
  return trainer.eval_batch_fns[key]


def trace_train(trainer, iterator) -> None:
  """Traces the train loop for `iterator` without running it: no weight
  changes; the first Trainer.train call then uses this graph."""
  if getattr(trainer, 'coordinated', None):
    trainer.coordinated.trace()
    return
  trainer._train_loop.tf_function.get_concrete_function(  # pylint: disable=protected-access
      iterator, tf.TensorSpec([], tf.int32))


def trace_eval(trainer, dataset) -> None:
  """Traces the eval step of a distributed `dataset` without running it."""
  # pylint: disable=protected-access
  if trainer._equalize_copies and replica_copies.drifting(trainer.model):
    trainer._equalize_copies.tf_function.get_concrete_function()
  if gathers_eval_outputs(trainer):
    eval_batch_fn(trainer, dataset.element_spec).tf_function.get_concrete_function()
  else:
    trainer._eval_loop.tf_function.get_concrete_function(iter(dataset))  # pylint: disable=protected-access


def build_streaming(trainer) -> None:
  """Builds the streaming metrics whose state comes with their first update
  (parts/streaming.py), from one batch of a fresh 'train' pipeline."""
  kinds = [m for m in trainer.streaming.values() if m]
  if all(all(metric.variables for metric in m.values()) for m in kinds):
    return
  batch = next(iter(trainer.dataset(
      'train', tf.distribute.InputContext(),
      trainer.global_batch_size // trainer.num_replicas)))

  def update(metrics):
    outputs = precision.float32(autograph.user(trainer.forward)(
        batch, training=False))
    autograph.user(trainer.update_streaming_metrics)(metrics, batch, outputs)
  for metrics in kinds:
    streaming.build(metrics, trainer.strategy, update)
