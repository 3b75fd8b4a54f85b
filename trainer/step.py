"""The replica step: one screen, in the order it runs.

For one replica's batch, inside `strategy.run` (replica context, traced):

  compute_gradients(trainer, batch)
    1. per-example loss   compute_loss(batch, forward(batch)) -> [B]
    2. global scaling     sum over this replica / the global batch size
    3. gradients          tape.gradient (of the scaled loss under
                          mixed_float16, divided by the scale right after)
  apply_gradients(trainer, grads, variables)
    4. all-reduce         ONE explicit all_reduce(SUM) of the gradients and
                          the step's scalars (loss, stop request)
    5. clip               by the global norm of the all-reduced gradient
    6. apply              the optimizer update, skipped on every replica
                          when the loss or gradient norm is not finite

Why each line is there:
  2. The SUM of per-replica sums divided by the global batch is the mean
     over the global batch, whatever the replica count; a per-replica mean
     would weigh replicas, not examples (tensorflow#28956). Weighted losses
     (values, weights) are normalised by the global weight sum instead,
     all-reduced before the gradients leave compute_gradients, so the
     gradients it returns are right for any way of applying them.
  3. Gradients come back unscaled, so a train_step override may hand them to
     any optimizer.
  4. Keras' optimizer would all-reduce again by itself in a replica context
     (DESIGN.md fact 1); `optimization.apply_reduced` tells it these are
     already summed. The stop request and the loss ride in the same
     collective, so every replica and worker sees the same values and takes
     the same decision (trainer/parts/status.py) at no extra launch.
  5. Clipping after the all-reduce makes it the same on 1 or N replicas.

The features hook in at named seams: `trainer.grad_accum_steps`
(parts/accumulation.py), `trainer.loss_scaling` (parts/loss_scale.py),
`trainer.clip_norm`, the status (parts/status.py); the per-example contract
is parts/contracts.py.
"""

import contextlib
import threading

import tensorflow as tf

from trainer import optimization
from trainer.parts import accumulation
from trainer.parts import autograph
from trainer.parts import contracts
from trainer.parts import precision
from trainer.parts import status as status_lib

SUM = tf.distribute.ReduceOp.SUM


@autograph.framework
def compute_gradients(trainer, batch):
  """(gradients, scaled loss, per-example values) of this replica's batch.

  The gradients are this replica's share of the gradient of the global-batch
  mean loss: summed over replicas they are the whole gradient. Under
  `train.grad_accum_steps=k` the batch runs as k micro-batches.

  Returns:
    (grads, loss, {'loss': per-example loss, metric: per-example values}),
    each value a tensor [B] or a (values, weights) pair.
  """
  summed, values = accumulation.accumulate(
      trainer.one_batch_gradients, batch, trainer.grad_accum_steps)
  grads, loss = summed['grads'], summed['loss']
  if 'weight' in summed:
    # 2'. Weighted: sum(loss * weight) over the global weight sum, which is
    # only known once every replica's micro-batches are through.
    total = tf.distribute.get_replica_context().all_reduce(
        SUM, summed['weight'])
    factor = tf.math.divide_no_nan(
        tf.cast(trainer.global_batch_size, total.dtype), total)
    grads = [g * factor for g in grads]
    loss = loss * factor
    if 'regularization_grads' in summed:
      grads = [g + r for g, r in zip(grads, summed['regularization_grads'])]
      loss += summed['regularization']
  return grads, loss, values


@autograph.framework
def forward(trainer, batch, *, training: bool):
  """trainer.forward's outputs, checked and, from a mixed-precision model,
  cast to float32: what the default steps' loss and metrics read."""
  # The Trainer's own methods are converted by AutoGraph, this file is not
  # (parts/autograph.py).
  return precision.float32(contracts.forward_outputs(
      autograph.user(trainer.forward)(batch, training=training),
      where=f'{type(trainer).__name__}.forward'))


@autograph.framework
def one_batch_gradients(trainer, batch):
  """Steps 1-3 for one (micro-)batch: ({'grads', 'loss', ...}, values)."""
  variables = trainer.trainable_variables
  scaling = trainer.loss_scaling
  size = contracts.batch_size(batch)
  where = f'{type(trainer).__name__}.compute_loss'
  # Persistent for a second gradient (weighted and regularized); in a traced
  # step that costs nothing.
  with tf.GradientTape(persistent=True) as tape:
    outputs = forward(trainer, batch, training=True)
    loss, weight = contracts.per_example(
        autograph.user(trainer.compute_loss)(batch, outputs), where=where,
        size=size)
    scaled = data_loss = _global_batch_share(loss, weight,
                                             trainer.global_batch_size)
    # Read after the forward pass: weight regularizers, and the activity
    # regularizers and add_loss() of this call.
    model_losses = trainer.model.losses
    regularized = bool(model_losses)
    regularization = None
    if regularized:
      # Counted once per step: 1/N on each of N replicas, 1/k in each of k
      # micro-batches.
      regularization = tf.nn.scale_regularization_loss(
          tf.add_n([tf.cast(l, tf.float32) for l in model_losses])
      ) / trainer.grad_accum_steps
      if weight is None:
        scaled += regularization
    objective = scaled if scaling is None else scaling.scale_loss(scaled)
  if regularized and weight is None:
    # The penalty has gradients whatever the loss: check the loss alone.
    _check_has_gradient(tape, data_loss, outputs, variables, where)
  summed = {'grads': _gradients(tape, objective, variables, scaling,
                               where=where),
            'loss': scaled}
  if weight is not None:
    summed['weight'] = tf.reduce_sum(weight)
    if regularized:
      # Not normalised by the weight sum: its own gradients.
      target = (regularization if scaling is None else
                scaling.scale_loss(regularization))
      summed['regularization_grads'] = _gradients(tape, target, variables,
                                                  scaling)
      summed['regularization'] = regularization
  del tape
  values = {'loss': loss if weight is None else (loss, weight)}
  where = f'{type(trainer).__name__}.compute_metrics'
  metrics = contracts.metrics_dict(autograph.user(trainer.compute_metrics)(
      batch, outputs), where=where)
  for name, value in metrics.items():
    value, weight = contracts.per_example(value, where=f'{where} [{name!r}]',
                                          size=size)
    values[name] = value if weight is None else (value, weight)
  if trainer.streaming['train']:
    autograph.user(trainer.update_streaming_metrics)(
        trainer.streaming['train'], batch, outputs)
  return summed, values


def _global_batch_share(loss, weight, global_batch_size: int):
  """This replica's share of the global-batch mean: sum / global batch.

  tf.nn.compute_average_loss, minus its checks of a batch size that the
  config already validated, which run at every step (an Assert and four
  ops): the same ops otherwise, so the same bits.
  """
  if weight is not None:
    return tf.nn.compute_average_loss(loss, sample_weight=weight,
                                      global_batch_size=global_batch_size)
  return tf.math.divide_no_nan(tf.reduce_sum(loss),
                               tf.constant(global_batch_size, loss.dtype))


def _gradients(tape, target, variables, scaling, where=None):
  grads = tape.gradient(target, variables)
  if where and variables and all(g is None for g in grads):
    raise _no_gradient(where)
  grads = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
           for g, v in zip(grads, variables)]
  return grads if scaling is None else scaling.unscale(grads)


def _check_has_gradient(tape, loss, outputs, variables, where):
  """Raises unless `loss` has a gradient. At trace time, by walking the
  graph back from it to the model's outputs, which makes no op; only a
  loss that does not reach them is differentiated, by the tape, whose ops
  the step then carries (a collective among them would run)."""
  floats = [t for t in tf.nest.flatten(outputs)
            if tf.is_tensor(t) and t.dtype.is_floating]
  if not variables or _reaches(loss, floats):
    return
  if all(g is None for g in tape.gradient(loss, variables)):
    raise _no_gradient(where)


def _reaches(loss, sources) -> bool:
  """Whether `loss` depends on one of `sources` through differentiable ops
  and float tensors (graph tensors only; False when it cannot tell)."""
  from tensorflow.python.framework import ops  # pylint: disable=g-direct-tensorflow-import,import-outside-toplevel
  targets = {t.ref() for t in sources if hasattr(t, 'op')}
  seen, pending = set(), [loss]
  while pending:
    tensor = pending.pop()
    if tensor.ref() in targets:
      return True
    if (tensor.ref() in seen or not hasattr(tensor, 'op') or
        not tensor.dtype.is_floating):
      continue
    seen.add(tensor.ref())
    try:
      differentiable = ops.get_gradient_function(tensor.op) is not None
    except LookupError:  # No gradient registered.
      differentiable = False
    if differentiable:
      pending.extend(tensor.op.inputs)
  return False


def _no_gradient(where):
  return contracts.ContractError(
      f'{where} returned a loss that no trainable weight has a gradient '
      'of, so training would change nothing: compute it from the outputs '
      'of forward with differentiable ops (not argmax, a cast to int or '
      'the labels alone)')


@autograph.framework
def apply_gradients(trainer, grads, variables, *, loss=None, optimizer=None):
  """Steps 4-6: all-reduce, clip, apply (replica context).

  Args:
    trainer: the Trainer (its stop request, clip norm, loss scaling).
    grads: this replica's gradients (from compute_gradients, or any whose
      sum over replicas is the step's gradient).
    variables: the variables they belong to.
    loss: this replica's scaled loss, checked for finiteness with the
      gradients (optional).
    optimizer: default `trainer.optimizer`; any Keras optimizer built under
      the strategy's scope (before the first trace).
  Returns:
    The step status, the same on every replica (parts/status.py).
  """
  optimizer = optimizer or trainer.optimizer
  # Dense, as compute_gradients gives them: the global norm (clipping, the
  # guard, the chart) of an Embedding's tf.IndexedSlices would count a
  # repeated row's pieces apart.
  grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
           for g in grads]
  variables = list(variables)
  if len(grads) != len(variables):
    raise contracts.ContractError(
        f'{type(trainer).__name__}: apply_gradients got {len(grads)} '
        f'gradients for {len(variables)} variables; take the gradients of '
        'the list you apply them to (self.trainable_variables)')
  if not optimizer.built:
    raise contracts.ContractError(
        f'{type(trainer).__name__}: apply_gradients got an optimizer that is '
        'not built; build it in __init__ under self.strategy.scope() with '
        'optimizer.build(variables) (optimizer variables cannot be created '
        'inside the traced step under a strategy)')
  # tf.identity places the reads on this replica's device; a bare variable
  # read has none, and the all-reduce then has no destination.
  extras = [tf.identity(trainer.stop_requested),
            tf.zeros([]) if loss is None else tf.identity(loss)]
  reduced = tf.distribute.get_replica_context().all_reduce(
      SUM, list(grads) + extras)
  grads, (stop, total_loss) = reduced[:-2], reduced[-2:]
  grad_norm = tf.linalg.global_norm(grads)
  finite = tf.math.is_finite(grad_norm) & tf.math.is_finite(total_loss)
  if trainer.clip_norm > 0:
    grads, _ = tf.clip_by_global_norm(grads, trainer.clip_norm,
                                      use_norm=grad_norm)
  _apply_if(finite, optimizer, grads, variables)
  loss_finite = (tf.math.is_finite(total_loss)
                 if trainer.loss_scaling is not None else None)
  status = status_lib.agreed(finite=finite, stop=stop, loss_finite=loss_finite)
  _records.current.add(status, grad_norm, finite)
  return status


class StepRecord:
  """What the apply_gradients calls of one traced step decided: the status,
  the global gradient norm and whether the update was applied, combined
  over several calls (a step with two optimizers: the worst status, the
  norm over all gradients, applied when all were).

  One per replica and step, kept per thread: MirroredStrategy traces each
  replica in a thread of its own, and the threads take turns at every
  all-reduce.
  """

  def __init__(self):
    self.status = None
    self.grad_norm = None
    self.applied = None  # Whether every call applied its update.

  def add(self, status, grad_norm, applied):
    if self.status is None:
      self.status, self.grad_norm, self.applied = status, grad_norm, applied
      return
    self.applied &= applied
    # Ordered by severity: NONFINITE > OVERFLOW > STOP_REQUESTED > OK.
    rank = tf.constant([0, 1, 3, 2])
    worse = tf.gather(rank, status) > tf.gather(rank, self.status)
    self.status = tf.where(worse, status, self.status)
    self.grad_norm = tf.sqrt(tf.square(self.grad_norm) + tf.square(grad_norm))


class _Records(threading.local):
  current = StepRecord()


_records = _Records()


@contextlib.contextmanager
def recording():
  """Within it (in one replica's step), apply_gradients calls record what
  they decided; yields the StepRecord."""
  previous, _records.current = _records.current, StepRecord()
  try:
    yield _records.current
  finally:
    _records.current = previous


def _apply_if(finite, optimizer, grads, variables):
  """optimizer update only when `finite` (replica context).

  A cond whose branch calls merge_call (as apply_gradients does under
  MirroredStrategy) is not allowed in a replica context, so there the cond
  runs in cross-replica context, as Keras' LossScaleOptimizer does.
  """
  def apply():
    optimization.apply_reduced(optimizer, zip(grads, variables))

  if tf.__internal__.distribute.strategy_supports_no_merge_call():
    # Here the cond and everything it touches sit on this replica's one
    # device, so it can stay one functional If op; by default TensorFlow
    # lowers it to Switch/Merge nodes around every op of the update. Either
    # costs the seed MLP's 0.3 ms step 15-20% (bench/step_cost.py), the two
    # within the noise of each other, and what was tried instead did no
    # better (docs/benchmarks.md). (Across devices, as under MirroredStrategy
    # below, an unlowered If cannot be placed, so that path is lowered.)
    with _unlowered_conds():
      tf.cond(finite, apply, lambda: None)
    return

  def cross_replica(distribution, finite, grads):
    def apply_everywhere():
      distribution.extended.call_for_each_replica(
          lambda g: optimization.apply_reduced(optimizer, zip(g, variables)),
          args=(grads,))
    first = distribution.experimental_local_results(finite)[0]
    tf.cond(first, apply_everywhere, lambda: None)

  tf.distribute.get_replica_context().merge_call(
      cross_replica, args=(finite, grads))


@contextlib.contextmanager
def _unlowered_conds():
  """tf.cond ops made within are not lowered to Switch/Merge.

  TF 2.21 has no public switch for this; the private flag is read when the
  If op is made (control_flow_util_v2.maybe_set_lowering_attr). Without it
  (another TF version) conds are lowered, which is correct, only slower.
  """
  from tensorflow.python.ops import control_flow_util_v2 as util  # pylint: disable=g-direct-tensorflow-import,import-outside-toplevel
  name = '_DISABLE_LOWER_USING_SWITCH_MERGE'
  if not hasattr(util, name):
    yield
    return
  previous = getattr(util, name)
  setattr(util, name, True)
  try:
    yield
  finally:
    setattr(util, name, previous)
