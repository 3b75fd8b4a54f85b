"""The Trainer base class: the subclass contract, wired by trainer/wiring.py.

A subclass supplies what is model-specific:

  build_model()                              -> tf.keras.Model
  dataset(split, input_context, batch_size)  -> batched tf.data.Dataset
  compute_loss(batch, outputs)               -> per-example loss [B], or a
                                                (loss [B], weights [B]) pair
  compute_metrics(batch, outputs)            -> {name: [B] or ([B], [B])}
  metric_names                               -> names compute_metrics returns

The base class owns everything distributed: variables under
`strategy.scope()`, `strategy.run`, the loss scaling by the *global* batch,
the explicit gradient all-reduce, the optimizer update, the inner loop and
the `strategy.reduce` of metrics. Where each of those lives:

  trainer/wiring.py  what the constructor builds: every variable, under
                     the scope, and the traced loops
  trainer/step.py    the replica step, one screen: loss -> scaling ->
                     gradients -> all-reduce -> clip -> apply
  trainer/loops.py   the inner tf.while_loop and the eval loop
  trainer/parts/     one feature each: accumulation, loss scaling, EMA,
                     metric sums, input wait, status, retrace counting,
                     per-replica randomness, the per-example contract

A subclass with an unusual step (two optimizers, a GAN) overrides
`train_step` and keeps the rest; see its docstring for the exact pattern.
"""

import contextlib

import tensorflow as tf

from trainer import loops
from trainer import schema
from trainer import settings as settings_lib
from trainer import step as step_lib
from trainer import wiring
from trainer.errors import UserError
from trainer.parts import autograph
from trainer.parts import distributed_input
from trainer.parts import input_wait
from trainer.parts import randomness
from trainer.parts import sharding
from trainer.persistence import export


class Trainer:
  """Base class; see the module docstring for the subclass contract.

  Attributes:
    config: the experiment ConfigDict, resolved: every framework key
      present (trainer/schema.py).
    strategy: the tf.distribute.Strategy everything runs under.
    settings: the StepSettings read from config (trainer/settings.py).
    model, optimizer: built under `strategy.scope()` in the constructor.
    global_step: int64 variable, the number of optimizer updates applied.
    data_position: int64 variable, global batches taken from the stream.
    loss_scale: the mixed_float16 loss-scale variable, or None.
    ema: the parts.ema.WeightAverage with train.ema_decay, or None.
    trace_counts: {function name: times traced}; after warm-up each stays 1.
  """

  metric_names: tuple[str, ...] = ()
  measures_input_wait = property(lambda self: input_wait.measurable())

  def __init__(self, *, config, strategy: tf.distribute.Strategy):
    # Any missing framework key takes its default (trainer/schema.py).
    self.config = config = schema.resolve(config)
    self.strategy = strategy
    self.num_replicas = strategy.num_replicas_in_sync
    self.is_tpu = isinstance(strategy, (tf.distribute.TPUStrategy,
                                        tf.distribute.experimental.TPUStrategy))
    self.settings = s = settings_lib.StepSettings.from_config(
        config, num_replicas=self.num_replicas, tpu=self.is_tpu)
    self.global_batch_size = s.global_batch_size
    self.eval_global_batch_size = s.eval_global_batch_size
    self.clip_norm, self.grad_accum_steps = s.clip_norm, s.grad_accum_steps
    if self.grad_accum_steps > 1 and type(self).train_step is not (
        Trainer.train_step):
      raise UserError(
          f'config key train.grad_accum_steps={self.grad_accum_steps}: '
          f'{type(self).__name__} overrides train_step, which then owns the '
          'step; accumulate there or set train.grad_accum_steps=1')
    self.reports_grad_norm = False  # Set when the train step is traced.
    randomness.install()
    # Every variable, under the scope and before the first trace; then the
    # traced loops (trainer/wiring.py).
    wiring.build_state(self)
    wiring.build_functions(self)

  # ---------------------------------------------------------------------------
  # The subclass contract.

  def build_model(self) -> tf.keras.Model:
    """Returns the model. Runs once, eagerly, under `strategy.scope()`."""
    raise NotImplementedError

  def dataset(self, split: str, input_context: tf.distribute.InputContext,
              batch_size: int) -> tf.data.Dataset:
    """Returns the batched dataset of `split` for one input pipeline.

    Runs eagerly, once per input pipeline. With `data.pipeline='per_host'`
    (default) it is called through `distribute_datasets_from_function`:
    `batch_size` is the per-replica batch and the dataset must shard by
    `input_context.input_pipeline_id`. With `'global'`, it is called once with
    a single-pipeline context and the global batch, and the strategy splits
    batches (auto-shard policy `data.auto_shard`).

    'train' must repeat forever with `drop_remainder=True`; eval splits are
    read once and may end in a partial batch.
    """
    raise NotImplementedError

  def compute_loss(self, batch, outputs):
    """The per-example loss (replica context, traced).

    Returns float [B], one loss per example, not a mean: the Trainer scales
    by the global batch. Or a pair (loss [B], weights [B]): the step then
    minimises sum(loss * weights) / (global sum of weights), e.g. each
    sequence's mean token loss weighted by its number of real tokens (a
    finite value even at weight 0: 0 x NaN is NaN; use divide_no_nan)."""
    raise NotImplementedError

  def compute_metrics(self, batch, outputs) -> dict:
    """{name: per-example value [B] or (value [B], weights [B])} for every
    name in `metric_names` (replica context, traced). Reported values are
    (weighted) means over every example of every replica."""
    del batch, outputs
    return {}

  def forward(self, batch, training: bool):
    """The model outputs for a batch (replica context, traced). The default
    reads (inputs, labels) tuples; override for other layouts (dicts)."""
    return self.model(batch[0], training=training)

  def serving_input_signature(self):
    """TensorSpecs of the exported serving function's inputs. The default
    reads the Keras model's inputs with a free batch dimension (a dict of
    inputs: one per key, named by it); override when the model has no
    static inputs (subclassed models)."""
    return export.model_input_specs(self.model)

  def build_streaming_metrics(self) -> dict:
    """{name: keras.metrics.Metric} with state (AUC, F1Score...), combined
    exactly across replicas and workers (parts/streaming.py). Called twice,
    eagerly, under strategy.scope(): for training and for evaluation."""
    return {}

  def update_streaming_metrics(self, metrics: dict, batch, outputs) -> None:
    """Updates `metrics` (those of build_streaming_metrics) from a batch
    (replica context, traced), e.g. metrics['auc'].update_state(y, p)."""
    del metrics, batch, outputs

  def eval_outputs(self, batch, outputs):
    """Per-example outputs to gather to the host over the whole eval split,
    {name: [B, ...]} (replica context, traced), for `aggregate`; None: none.
    """
    del batch, outputs

  eval_outputs.is_default = True  # Overridden: evaluations gather outputs.

  def aggregate(self, outputs: dict) -> dict:
    """{name: value} from `eval_outputs` over the whole split (host; numpy
    arrays holding each example exactly once)."""
    del outputs
    return {}

  def derived_metrics(self, metrics: dict) -> dict:
    """{name: value} from reported metrics (host: each eval and train
    summary, and once before the run on made-up values), e.g. exp(loss)."""
    del metrics
    return {}

  def actions(self) -> list:
    """Host actions (trainer/actions.py) the controller runs between inner
    loops; called once, on the host."""
    return []

  def serve(self, *inputs):
    """The exported serving computation (traced; no strategy, no training).
    The default returns {'outputs': model(inputs)} (a dict output as it
    is; a list as outputs_0, ...); override to add post-processing such as
    class ids or probabilities."""
    return export.call_model(self.model, inputs)

  # ---------------------------------------------------------------------------
  # The replica step (trainer/step.py). Override `train_step` for an unusual
  # update; call the methods below from it.

  @property
  def trainable_variables(self) -> list:
    """What the step differentiates and updates: the model's trainable
    weights, a weight sharded over ps tasks (train.variable_shard_bytes) as
    its pieces (parts/sharding.py). Use it, not the model's, in a
    train_step override."""
    return sharding.trainable_variables(self.model)

  def train_step(self, batch) -> dict:
    """One optimizer step on this replica's batch (replica context, traced).

    An override returns {'loss': per-example loss, metric: per-example
    values} and updates the weights with `self.compute_gradients` and
    `self.apply_gradients` (the all-reduce once), or with the tutorial
    pattern (a loss scaled by the global batch, then
    `self.optimizer.apply_gradients`: Keras sums); both are exact for any
    replica count. docs/writing-a-trainer.md shows them, and a second
    optimizer; only apply_gradients gives the NaN guard, the stop request
    and the gradient norm.
    """
    grads, loss, values = self.compute_gradients(batch)
    self.apply_gradients(grads, self.trainable_variables, loss=loss)
    return values

  @autograph.framework
  def compute_gradients(self, batch):
    """(grads, scaled loss, per-example values) of this replica's batch, as
    the default step computes them: the global-batch scaling, weighted
    losses, micro-batches, unscaled under mixed_float16, XLA (step.py)."""
    return step_lib.compute_gradients(self, batch)

  @autograph.framework
  def apply_gradients(self, grads, variables, *, loss=None, optimizer=None):
    """All-reduces (SUM, once), clips and applies gradients (replica
    context); returns the step status. See step.apply_gradients."""
    return step_lib.apply_gradients(self, grads, variables, loss=loss,
                                    optimizer=optimizer)

  def eval_step(self, batch) -> dict:
    """Per-example loss and metrics of a batch (replica context, traced);
    with `eval_outputs`, also them under 'outputs'."""
    outputs = step_lib.forward(self, batch, training=False)
    values = {'loss': self.compute_loss(batch, outputs),
              **self.compute_metrics(batch, outputs)}
    if self.streaming['eval']:
      self.update_streaming_metrics(self.streaming['eval'], batch, outputs)
    gathered = self.eval_outputs(batch, outputs)
    if gathered is not None:
      values['outputs'] = gathered
    return values

  eval_step.is_default = True  # Empty replica batches are skipped (loops.py).

  # ---------------------------------------------------------------------------
  # Input and loops: called from the host by the controller.

  def distribute_dataset(self, split: str, *, batch_size: int,
                         skip_batches: int = 0, service_job: str = 'distloop'):
    """The distributed dataset of `split` at `batch_size` (global), after
    `skip_batches` global batches (parts/distributed_input.py)."""
    return distributed_input.distribute(self, split, batch_size=batch_size,
                                        skip_batches=skip_batches,
                                        service_job=service_job)

  def train(self, iterator, num_steps: int, *,
            measure_input_wait: bool = False) -> dict[str, float]:
    """Runs up to `num_steps` steps in one tf.function call; returns the
    loop's metrics (loops.train says which). It ends early, after the step
    in flight, on a stop request or a non-finite step (not applied)."""
    return loops.train(self, iterator, num_steps,
                       measure_input_wait=measure_input_wait)

  def evaluate(self, split: str = 'test') -> dict[str, float]:
    """Loss and metrics over the whole of `split`, each example once (with
    the moving-average weights when train.ema_decay is set), streaming,
    aggregated and derived metrics included."""
    return loops.evaluate(self, split)

  def weight_norm(self) -> float:
    """Global L2 norm of the trainable weights (host, eager; not traced)."""
    return float(tf.linalg.global_norm(self.model.trainable_variables))

  def learning_rate(self) -> float:
    """The optimizer's learning rate at the current step (host, eager)."""
    return float(tf.convert_to_tensor(self.optimizer.learning_rate))

  def ema_weights(self):
    """Within it the model holds the moving-average weights (eval, export);
    the training weights come back on exit. A no-op without the average."""
    return self.ema.swapped_in() if self.ema else contextlib.nullcontext()

  def checkpoint_items(self, model_only: bool = False) -> dict:
    """What a checkpoint holds besides step and data position: the model,
    the weight average, the random-number state of its layers, and (unless
    model_only) the optimizer and the loss scale. Override to add state of
    your own (a second optimizer), calling super()."""
    items = {'model': self.model}
    if self.ema:
      items['ema'] = self.ema.averages
    if seeds := randomness.seed_states(self.model, self):
      items['rng'] = seeds
    if not model_only:
      items['optimizer'] = self.optimizer
      if self.loss_scale is not None:
        items['loss_scale'] = self.loss_scale
        items['loss_scale_good_steps'] = self.loss_scaling.good_steps
    return items
