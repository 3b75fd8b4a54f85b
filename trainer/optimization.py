"""Optimizers and learning-rate schedules from config.

Keras' own cross-replica aggregation is disabled on every optimizer made
here. Why: Keras 3's TensorFlow optimizer sums gradients across replicas by
itself when `apply_gradients` runs in a replica context
(`TFOptimizer._all_reduce_sum_gradients`). The Trainer all-reduces explicitly
(so the reduction is visible, and clipping sees the global gradient), so the
optimizer must not sum a second time, or every update would be N x too large
on N replicas. Keras 3 has no public switch for this, so `build_optimizer`
replaces that one method on the instance with the identity. The 1-vs-N replica
weight tests (tests/trainer/trainer_test.py) fail if gradients are ever summed
twice or not at all.

Adam, AdamW and Lamb here are Keras' own classes with one change: Keras
recomputes the step's bias corrections (two `pow`s, a `sqrt`, casts and
divisions) and reads the step counter once per variable; these compute them
once per device and step and share them across the variables. The update is
the same arithmetic in the same order, bitwise equal to Keras' (tested in
tests/trainer/optimization_test.py), with ~10 fewer ops per variable per
step: ~3% of the seed MLP's 0.3 ms step (bench/throughput.py).

Config keys (the `optimizer` ConfigDict; all but name/learning_rate optional):
  name            sgd | adam | adamw | lamb
  learning_rate   peak learning rate (after warmup)
  momentum, nesterov        sgd only
  beta_1, beta_2, epsilon   adam, adamw, lamb
  weight_decay    decoupled weight decay (0: none; adamw's default 0.01 is
                  not applied unless set here)
  weight_decay_exclude      substrings of variable paths never decayed
                  (default: biases and normalization layers: 'bias', 'norm',
                  'gamma', 'beta')
  schedule        constant | cosine | linear | step
  warmup_steps    linear warmup from 0 to learning_rate
  decay_steps     steps of the decay after warmup (default: train.steps -
                  warmup_steps)
  end_learning_rate_factor  cosine/linear end value, as a fraction of peak
  step_boundaries, step_factor  step decay: multiply by step_factor at each
                  boundary (steps counted from the start of training)
"""

import math
import threading

import tensorflow as tf

from trainer.errors import UserError

OPTIMIZERS = ('sgd', 'adam', 'adamw', 'lamb')
SCHEDULES = ('constant', 'cosine', 'linear', 'step')
DEFAULT_EXCLUDE = ('bias', 'norm', 'gamma', 'beta')


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

  def _step_scalars(self, variable, learning_rate):
    """(learning rate, 1 - beta_1^t, 1 - beta_2^t) in variable's dtype, as
    Keras computes them (t = iterations + 1)."""
    cache = getattr(self._cache, 'scalars', None)
    key = (id(self), variable.device, variable.dtype)
    if cache is not None and key in cache:
      return cache[key]
    dtype = variable.dtype
    local_step = tf.cast(self.iterations + 1, dtype)
    scalars = (tf.cast(learning_rate, dtype),
               1 - tf.pow(tf.cast(self.beta_1, dtype), local_step),
               1 - tf.pow(tf.cast(self.beta_2, dtype), local_step))
    if cache is not None:
      cache[key] = scalars
    return scalars


def _adam_update_step(self, gradient, variable, learning_rate):
  """keras.optimizers.Adam.update_step with the step's scalars shared."""
  if self.amsgrad:
    return tf.keras.optimizers.Adam.update_step(self, gradient, variable,
                                                learning_rate)
  lr, bias_1, bias_2 = self._step_scalars(variable, learning_rate)  # pylint: disable=protected-access
  alpha = lr * tf.sqrt(bias_2) / bias_1
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
  """The learning rate: a float, or a WarmupDecay for non-constant schedules."""
  schedule = config.get('schedule', 'constant')
  warmup = config.get('warmup_steps', 0)
  if schedule not in SCHEDULES:
    raise UserError(f'config key optimizer.schedule={schedule!r} is unknown; '
                    f'valid: {", ".join(SCHEDULES)}')
  if not isinstance(warmup, int) or warmup < 0:
    raise UserError(f'config key optimizer.warmup_steps={warmup!r} must be an '
                    'integer >= 0')
  if total_steps and warmup >= total_steps and schedule != 'constant':
    raise UserError(f'config key optimizer.warmup_steps={warmup} leaves no '
                    f'steps to decay in train.steps={total_steps}; lower it')
  if schedule == 'constant' and not warmup:
    return config.learning_rate
  boundaries = tuple(config.get('step_boundaries', ()))
  if schedule == 'step' and (not boundaries or list(boundaries) != sorted(
      boundaries)):
    raise UserError('config key optimizer.step_boundaries='
                    f'{boundaries!r} must be a non-empty increasing tuple of '
                    'steps for schedule=step, e.g. (30000, 60000)')
  return WarmupDecay(
      peak=config.learning_rate, schedule=schedule, warmup_steps=warmup,
      decay_steps=config.get('decay_steps', 0) or max(total_steps - warmup, 1),
      end_factor=config.get('end_learning_rate_factor', 0.0),
      step_boundaries=boundaries, step_factor=config.get('step_factor', 0.1))


def build_optimizer(config, *, variables=None,
                    total_steps: int = 0) -> tf.keras.optimizers.Optimizer:
  """Builds the optimizer named by `config.name` (call under strategy.scope()).

  Args:
    config: the `optimizer` ConfigDict (see the module docstring).
    variables: the trainable variables; needed for weight-decay exclusions.
    total_steps: train.steps, the default end of a decaying schedule.
  Raises:
    UserError: an unknown name or schedule, a bad value or combination.
  """
  name = config.name
  if name not in OPTIMIZERS:
    raise UserError(f'config key optimizer.name={name!r} is unknown; '
                    f'valid: {", ".join(OPTIMIZERS)}')
  if config.learning_rate <= 0:
    raise UserError(f'config key optimizer.learning_rate={config.learning_rate}'
                    ' must be > 0')
  if name != 'sgd' and (config.get('momentum', 0.0) or
                        config.get('nesterov', False)):
    raise UserError(f'config keys optimizer.momentum/nesterov apply to sgd '
                    f'only, not optimizer.name={name!r}; set them to 0/False')
  weight_decay = config.get('weight_decay', 0.0)
  if weight_decay < 0:
    raise UserError(f'config key optimizer.weight_decay={weight_decay} must '
                    'be >= 0')
  learning_rate = build_schedule(config, total_steps)
  common = dict(learning_rate=learning_rate,
                weight_decay=weight_decay or None)
  adam_like = dict(beta_1=config.get('beta_1', 0.9),
                   beta_2=config.get('beta_2', 0.999),
                   epsilon=config.get('epsilon', 1e-7))
  if name == 'sgd':
    optimizer = tf.keras.optimizers.SGD(
        momentum=config.get('momentum', 0.0),
        nesterov=config.get('nesterov', False), **common)
  elif name == 'adam':
    optimizer = Adam(**adam_like, **common)
  elif name == 'adamw':
    optimizer = AdamW(**adam_like, **dict(common, weight_decay=weight_decay))
  else:
    optimizer = Lamb(**adam_like, **common)
  if weight_decay and variables is not None:
    patterns = tuple(config.get('weight_decay_exclude', DEFAULT_EXCLUDE))
    excluded = [v for v in variables
                if any(p in getattr(v, 'path', v.name) for p in patterns)]
    if excluded:
      optimizer.exclude_from_weight_decay(var_list=excluded)
  disable_cross_replica_aggregation(optimizer)
  return optimizer


def disable_cross_replica_aggregation(optimizer) -> None:
  """Makes `optimizer.apply_gradients` use the gradients it is given as-is."""
  if not hasattr(optimizer, '_all_reduce_sum_gradients'):
    raise RuntimeError(
        f'{type(optimizer).__name__} has no _all_reduce_sum_gradients: this '
        'Keras version aggregates gradients differently; pin keras==3.15.1 '
        '(requirements.txt) or update trainer/optimization.py')
  optimizer._all_reduce_sum_gradients = list  # pylint: disable=protected-access
