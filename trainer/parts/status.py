"""The status of a train step, agreed by every replica and worker.

The status is decided from values that went through the step's all-reduce
(the global loss, the global gradient norm, the host's stop request), so
every replica of every worker computes the same one and the inner loop ends
after the same step everywhere. Anything but OK (or OVERFLOW) ends the loop.
Between inner loops the host's own stop decisions are agreed the same way
(`host_stops`, `any_worker`).
"""

import math

import tensorflow as tf

from trainer.parts import autograph

OK = 0
# The host asked to stop (SIGTERM, Ctrl-C): the step was applied, the loop
# ends.
STOP_REQUESTED = 1
# The loss or gradient norm was NaN/Inf: the update was skipped everywhere.
NONFINITE = 2
# mixed_float16: the scaled gradients overflowed float16. The update is
# skipped, the loss scale halves and the loop goes on (not an error).
OVERFLOW = 3


def continues(status, overflow: bool = True):
  """Whether the inner loop may run another step after `status`.

  overflow=False (no loss scaling: no step can be an OVERFLOW) saves the
  loop condition two ops per step.
  """
  if not overflow:
    return status == OK
  return (status == OK) | (status == OVERFLOW)


def applied(status):
  """Whether the step that returned `status` changed the weights."""
  return (status == OK) | (status == STOP_REQUESTED)


def agreed(*, finite, stop, loss_finite=None):
  """The status from all-reduced values (the same on every replica).

  Args:
    finite: whether the global loss and gradient norm are finite.
    stop: the all-reduced stop request (> 0: stop after this step).
    loss_finite: under loss scaling, whether the loss alone is finite:
      non-finite gradients with a finite loss are an OVERFLOW of the scale.
  """
  bad = NONFINITE
  if loss_finite is not None:
    bad = tf.where(loss_finite, OVERFLOW, NONFINITE)
  return tf.where(finite, tf.where(stop > 0, STOP_REQUESTED, OK), bad)


def reduced(loss, stop_requested, variables=()):
  """The status of a training step that did not go through
  Trainer.apply_gradients: the finiteness of its loss and of `variables`
  (read after the step's own update) and the stop request, summed over every
  replica and worker in one all-reduce (replica context), so all of them
  take the same decision.

  The weights are checked because a finite loss does not make a finite
  gradient: a fused MatMul+BiasAdd+Relu turns NaN inputs into 0 on some CPUs
  (oneDNN, AVX-512), and its gradient is then NaN.
  """
  finite = [tf.reduce_all(tf.math.is_finite(loss))]
  finite += [tf.reduce_all(tf.math.is_finite(v)) for v in variables]
  bad = tf.cast(tf.logical_not(tf.reduce_all(tf.stack(finite))), tf.float32)
  # tf.identity places the read on this replica's device (as in step.py).
  flags = tf.distribute.get_replica_context().all_reduce(
      tf.distribute.ReduceOp.SUM,
      tf.stack([bad, tf.cast(tf.identity(stop_requested), tf.float32)]))
  return agreed(finite=flags[0] == 0, stop=flags[1])


def local(loss, stop_requested):
  """The status from this replica's own view, for an eval step."""
  finite = tf.reduce_all(tf.math.is_finite(loss))
  return tf.where(finite, tf.where(stop_requested > 0, STOP_REQUESTED, OK),
                  NONFINITE)


@autograph.framework  # Also asked in the eval loop, which is converted.
def several_workers(strategy) -> bool:
  """Whether `strategy` spans several worker processes (each with its own
  host loop)."""
  return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and
          len(strategy.extended.worker_devices) <
          strategy.num_replicas_in_sync)


def host_stops(requested: bool, strategy) -> bool:
  """Whether the host stops between two inner loops for a stop request.

  One process: when it has one. Several workers: never by itself. Each
  worker's SIGTERM lands at its own moment; a worker that stopped here
  alone would leave the others waiting in their next all-reduce forever.
  Its request goes into the next step's all-reduce instead, and every
  worker stops after that step (`agreed`).
  """
  return requested and not several_workers(strategy)


def any_worker(flag: bool, strategy) -> bool:
  """`flag` or'ed over the workers: one all-reduce, which every worker must
  reach at the same point of its host loop (e.g. after the last step)."""
  if not several_workers(strategy):
    return flag

  @tf.function(autograph=False)  # Eager strategy.run warns of overhead.
  def count(value):
    flags = strategy.run(tf.identity, args=(value,))
    return strategy.reduce(tf.distribute.ReduceOp.SUM, flags, axis=None)
  return float(count(tf.constant(float(flag)))) > 0


def nonfinite_message(step: int, loss: float | None, *, nan_retries: int,
                      used_up: bool, guarded: bool, clip_norm: float) -> str:
  """The one line a run stops with after a NONFINITE step it cannot retry.

  Args:
    step: the step that failed.
    loss: the failed inner loop's mean loss (None: unknown). Finite, it was
      the gradient (or, without the guard, the weights) that was not.
    nan_retries: train.nan_retries.
    used_up: the retries were used up (else there were none, or no
      checkpoint to restore).
    guarded: the step went through apply_gradients, whose guard skipped it
      (a train_step of its own that bypassed it applied it).
    clip_norm: train.clip_norm (advised when unset and the step goes
      through apply_gradients, which alone clips).
  """
  n = nan_retries
  tried = (f' after {n} retr{"y" if n == 1 else "ies"}' if used_up else
           ' with no checkpoint to restore' if n else '')
  other = 'gradient norm' if guarded else 'weights'
  what = (f'loss or {other}' if loss is None else 'loss' if
          not math.isfinite(loss) else f'{other} (the loss was finite)')
  fix = ('look for NaN or Inf in the inputs of that batch, or lower the '
         'learning rate' + ('' if clip_norm or not guarded else
                            ' or enable train.clip_norm')
         if step > 1 else
         'no step was trained before it: look for NaN or Inf in the '
         'inputs' + (' or the loss' if what == 'loss' else ', or an op whose '
                     'gradient is infinite where its value is not (sqrt or '
                     'log at 0; a NaN masked out of the loss with tf.where '
                     'still gives a NaN gradient)'))
  return (f'non-finite {what} at step {step}{tried}; '
          f'{"the update was not applied and " if guarded else ""}no '
          f'checkpoint was written after it (train.nan_retries={n}); {fix}' +
          ('' if n else ' (or set train.nan_retries)'))
