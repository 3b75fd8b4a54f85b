"""Optimizers and learning-rate schedules from config.

The optimizers made here are plain Keras optimizers under a strategy: called
in a replica context, `optimizer.apply_gradients` sums the gradients across
replicas itself (Keras 3's `TFOptimizer._all_reduce_sum_gradients`), as the
tutorial training loop expects. The Trainer's own step all-reduces
explicitly (so the reduction is visible, and clipping sees the global
gradient), and applies those already-summed gradients through
`apply_reduced`, which tells that one call not to sum them again. Keras 3
has no public switch for this (keras#19308), so the first `apply_reduced`
call on an optimizer wraps its `_all_reduce_sum_gradients` in a gate that
passes the gradients through while an `apply_reduced` call is under way and
calls Keras otherwise. The 1-vs-N replica weight tests
(tests/trainer/trainer_test.py, tests/trainer/apply_paths_test.py) fail if
gradients are summed twice or not at all on any of these paths.

Adam, AdamW and Lamb here are Keras' own classes with one change: Keras
recomputes the step's bias corrections (two `pow`s, a `sqrt`, casts and
divisions) and reads the step counter once per variable; these compute them,
and Adam's step size, once per device and step and share them across the
variables. The update is the same arithmetic in the same order, bitwise
equal to Keras' (tested in tests/trainer/optimization_test.py), with ~13
fewer ops per variable per step: the minimal loop with these runs 1.09-1.13 x
its speed with Keras' Adam in two runs of bench/step_cost.py (`ours`), whose
rounds spread by more than that.

The `optimizer` config section (its keys, defaults and meanings are in
trainer/schema.py) picks the optimizer, its schedule and weight decay.
Weight decay is decoupled (x learning rate) for every optimizer; adamw's
own default 0.01 is not applied unless set.
"""

import math
import threading

import tensorflow as tf

from trainer import schema


class WarmupDecay(tf.keras.optimizers.schedules.LearningRateSchedule):
  """Linear warmup to `peak`, then constant, cosine, linear or step decay."""

  def __init__(self, *, peak, schedule='constant', warmup_steps=0,
               decay_steps=1, end_factor=0.0, step_boundaries=(),
               step_factor=0.1):
    super().__init__()
    self.peak = float(peak)
    self.schedule = schedule
    self.warmup_steps = int(warmup_steps)
    self.decay_steps = max(int(decay_steps), 1)
    self.end_factor = float(end_factor)
    self.step_boundaries = tuple(int(b) for b in step_boundaries)
    self.step_factor = float(step_factor)

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    if self.schedule == 'step':
      crossed = tf.add_n([tf.cast(step >= b, tf.float32)
                          for b in self.step_boundaries] or [tf.zeros([])])
      decayed = self.peak * tf.pow(self.step_factor, crossed)
    else:
      progress = tf.clip_by_value(
          (step - self.warmup_steps) / self.decay_steps, 0.0, 1.0)
      if self.schedule == 'cosine':
        shape = 0.5 * (1.0 + tf.cos(math.pi * progress))
      elif self.schedule == 'linear':
        shape = 1.0 - progress
      else:
        shape = tf.ones([])
      decayed = self.peak * (self.end_factor + (1 - self.end_factor) * shape)
    if not self.warmup_steps:
      return decayed
    warmup = self.peak * step / self.warmup_steps
    return tf.where(step < self.warmup_steps, warmup, decayed)

  def get_config(self):
    return dict(peak=self.peak, schedule=self.schedule,
                warmup_steps=self.warmup_steps, decay_steps=self.decay_steps,
                end_factor=self.end_factor,
                step_boundaries=self.step_boundaries,
                step_factor=self.step_factor)


class _SharedStepScalars:
  """Mixin: `_step_scalars` computes per-step scalars once per update.

  Keras calls `update_step(gradient, variable, learning_rate)` for each
  variable from `_distributed_tf_update_step` (inside `extended.update`, on
  the variable's device). Scalars that depend only on the step are cached
  for the duration of that call, one set per device and dtype. The cache is
  per thread: MirroredStrategy may run replica functions in threads.
  """

  _cache = threading.local()

  def _distributed_tf_update_step(self, distribution, grads_and_vars,
                                  learning_rate):
    self._cache.scalars = {}
    try:
      return super()._distributed_tf_update_step(distribution, grads_and_vars,
                                                 learning_rate)
    finally:
      self._cache.scalars = None

  def _shared(self, variable, what, make):
    """make(), computed once per update, device and dtype (per variable
    when not called from an update)."""
    cache = getattr(self._cache, 'scalars', None)
    key = (id(self), what, variable.device, variable.dtype)
    if cache is not None and key in cache:
      return cache[key]
    value = make()
    if cache is not None:
      cache[key] = value
    return value

  def _step_scalars(self, variable, learning_rate):
    """(learning rate, 1 - beta_1^t, 1 - beta_2^t) in variable's dtype, as
    Keras computes them (t = iterations + 1)."""
    def make():
      dtype = variable.dtype
      local_step = tf.cast(self.iterations + 1, dtype)
      return (tf.cast(learning_rate, dtype),
              1 - tf.pow(tf.cast(self.beta_1, dtype), local_step),
              1 - tf.pow(tf.cast(self.beta_2, dtype), local_step))
    return self._shared(variable, 'step', make)


def _adam_update_step(self, gradient, variable, learning_rate):
  """keras.optimizers.Adam.update_step with the step's scalars shared."""
  if self.amsgrad:
    return tf.keras.optimizers.Adam.update_step(self, gradient, variable,
                                                learning_rate)
  # pylint: disable=protected-access
  lr, bias_1, bias_2 = self._step_scalars(variable, learning_rate)
  alpha = self._shared(variable, 'alpha',
                       lambda: lr * tf.sqrt(bias_2) / bias_1)
  # pylint: enable=protected-access
  gradient = tf.cast(gradient, variable.dtype)
  index = self._get_variable_index(variable)  # pylint: disable=protected-access
  m, v = self._momentums[index], self._velocities[index]  # pylint: disable=protected-access
  self.assign_add(m, (gradient - m) * (1 - self.beta_1))
  self.assign_add(v, (tf.square(gradient) - v) * (1 - self.beta_2))
  self.assign_sub(variable, (m * alpha) / (tf.sqrt(v) + self.epsilon))


class Adam(_SharedStepScalars, tf.keras.optimizers.Adam):
  update_step = _adam_update_step


class AdamW(_SharedStepScalars, tf.keras.optimizers.AdamW):
  update_step = _adam_update_step


class Lamb(_SharedStepScalars, tf.keras.optimizers.Lamb):
  """keras.optimizers.Lamb with the step's scalars shared."""

  def update_step(self, gradient, variable, learning_rate):
    lr, bias_1, bias_2 = self._step_scalars(variable, learning_rate)
    gradient = tf.cast(gradient, variable.dtype)
    index = self._get_variable_index(variable)
    m, v = self._momentums[index], self._velocities[index]
    self.assign_add(m, (gradient - m) * (1 - self.beta_1))
    self.assign_add(v, (tf.square(gradient) - v) * (1 - self.beta_2))
    update = (m / bias_1) / (tf.sqrt(v / bias_2) + self.epsilon)
    w_norm = tf.sqrt(tf.reduce_sum(tf.pow(variable, 2)))
    g_norm = tf.sqrt(tf.reduce_sum(tf.pow(update, 2)))
    ratio = tf.where(w_norm > 0,
                     tf.where(g_norm > 0, w_norm / g_norm, 1.0), 1.0)
    self.assign_sub(variable, ratio * lr * update)


def build_schedule(config, total_steps: int):
  """The learning rate of a resolved `optimizer` section: a float, or a
  WarmupDecay for non-constant schedules."""
  if config.schedule == 'constant' and not config.warmup_steps:
    return config.learning_rate
  warmup = config.warmup_steps
  return WarmupDecay(
      peak=config.learning_rate, schedule=config.schedule,
      warmup_steps=warmup,
      decay_steps=config.decay_steps or max(total_steps - warmup, 1),
      end_factor=config.end_learning_rate_factor,
      step_boundaries=tuple(config.step_boundaries),
      step_factor=config.step_factor)


def build_optimizer(config, *, variables=None,
                    total_steps: int = 0) -> tf.keras.optimizers.Optimizer:
  """Builds the optimizer named by `config.name` (call under strategy.scope()).

  Args:
    config: an `optimizer` section, complete or partial: missing keys take
      their defaults (trainer/schema.py lists them).
    variables: the trainable variables; needed for weight-decay exclusions.
    total_steps: train.steps, the default end of a decaying schedule.
  Raises:
    UserError: a bad value or combination, naming the key.
  """
  config = schema.resolve_section('optimizer', config,
                                  total_steps=total_steps)
  name, weight_decay = config.name, config.weight_decay
  common = dict(learning_rate=build_schedule(config, total_steps),
                weight_decay=weight_decay or None)
  adam_like = dict(beta_1=config.beta_1, beta_2=config.beta_2,
                   epsilon=config.epsilon)
  if name == 'sgd':
    optimizer = tf.keras.optimizers.SGD(
        momentum=config.momentum, nesterov=config.nesterov, **common)
  elif name == 'adam':
    optimizer = Adam(**adam_like, **common)
  elif name == 'adamw':
    optimizer = AdamW(**adam_like, **dict(common, weight_decay=weight_decay))
  else:
    optimizer = Lamb(**adam_like, **common)
  if weight_decay and variables is not None:
    patterns = tuple(config.weight_decay_exclude)
    excluded = [v for v in variables
                if any(p in getattr(v, 'path', v.name) for p in patterns)]
    if excluded:
      optimizer.exclude_from_weight_decay(var_list=excluded)
  return optimizer


def apply_reduced(optimizer, grads_and_vars) -> None:
  """`optimizer.apply_gradients` for gradients already summed across
  replicas (replica context): Keras does not sum them again.

  Works for any Keras 3 optimizer; the gate is a counter, not a thread-local,
  because MirroredStrategy may run the apply of each replica in a thread of
  its own (call_for_each_replica inside a merge_call).
  """
  if not getattr(optimizer, '_distloop_gate', False):
    if not hasattr(optimizer, '_all_reduce_sum_gradients'):
      raise RuntimeError(
          f'{type(optimizer).__name__} has no _all_reduce_sum_gradients: this '
          'Keras version aggregates gradients differently; pin keras==3.15.1 '
          '(requirements.txt) or update trainer/optimization.py')
    keras_sum = optimizer._all_reduce_sum_gradients  # pylint: disable=protected-access

    def gated(grads_and_vars):
      if optimizer._distloop_reduced:  # pylint: disable=protected-access
        return list(grads_and_vars)
      return keras_sum(grads_and_vars)
    optimizer._all_reduce_sum_gradients = gated  # pylint: disable=protected-access
    optimizer._distloop_reduced = 0  # pylint: disable=protected-access
    optimizer._distloop_gate = True  # pylint: disable=protected-access
  optimizer._distloop_reduced += 1  # pylint: disable=protected-access
  try:
    optimizer.apply_gradients(grads_and_vars)
  finally:
    optimizer._distloop_reduced -= 1  # pylint: disable=protected-access
