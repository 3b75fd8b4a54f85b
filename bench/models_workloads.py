"""What bench/models.py compares: two real models, three training loops.

The workloads (`get_workload`): ResNet-20 on synthetic CIFAR-sized images
and the byte-level Transformer LM, each from its config file. The methods,
each a builder returning `run(steps) -> (mean loss, wall seconds, CPU
seconds)` of one call: the registered Trainer (`trainer_method`, also with
XLA), the tutorial's hand-written loop (`bare_method`) and Keras fit
(`keras_fit_method`). All start from the same initial weights and read the
same input function with the same hyper-parameters, so they differ only in
the training loop around them.

Imports TensorFlow: for bench/models.py's child processes.
"""

import time

import tensorflow as tf

from configs import cifar_resnet20
from configs import lm_transformer
import models  # noqa: F401  (registers the trainers)
from input import synthetic_images
from input import text
from models import resnet
from models import transformer
from trainer import schema
from trainer.experiment import registry

SEED = 0


class Workload:
  """One benchmarked model: its config and the Trainer's pieces, replayed
  with plain Keras and TensorFlow for the bare loop and Keras fit.

  Each piece mirrors the Trainer's own code path (same builder and
  arguments, same input function, same hyper-parameters), so the methods
  differ only in the training loop around them.
  """

  def __init__(self, name, *, config_file, variant, config, steps, xla_steps,
               title):
    self.name = name
    self.config_file = config_file
    self.variant = variant
    # A config file states only what differs from the framework's defaults
    # (trainer/schema.py): resolved, it holds every key the Trainer reads,
    # which the bare loop and Keras fit read too.
    self.config = schema.resolve(config)
    self.config.seed = SEED
    # Steps per call, so that one call takes ~1-2 s on 2 CPU cores; XLA's
    # CPU backend is slower on ResNet-20's convolutions: fewer steps there.
    self.steps = steps
    self.xla_steps = xla_steps
    self.title = title
    self.batch = config.train.global_batch_size

  def trainer(self, strategy, jit_compile=False):
    """The registered Trainer of the config (`image_classifier`, `lm`)."""
    config = self.config.copy_and_resolve_references()
    config.train.jit_compile = jit_compile
    config.train.steps_per_loop = self.steps
    tf.keras.utils.set_random_seed(SEED)  # Same initial weights everywhere.
    return registry.get(config.trainer)(config=config, strategy=strategy)

  def build_model(self):
    """The Trainer's model, built by the same builder with the same
    arguments and seed (so with the same initial weights)."""
    tf.keras.utils.set_random_seed(SEED)
    model = self.config.model
    if self.name == 'resnet20':  # As ImageClassifierTrainer.build_model.
      size = self.config.data.image_size
      return resnet.build_cifar_resnet(
          depth=20, num_classes=model.num_classes,
          base_filters=model.base_filters, input_shape=(size, size, 3),
          sync_batch_norm=model.sync_batch_norm,
          bn_momentum=model.bn_momentum)
    return transformer.build_transformer_lm(  # As LMTrainer.build_model.
        vocab_size=text.VOCAB_SIZE, seq_len=model.seq_len, width=model.width,
        depth=model.depth, num_heads=model.heads, mlp_ratio=model.mlp_ratio,
        positions=model.positions, tie_embeddings=model.tie_embeddings,
        dropout=model.dropout)

  def dataset(self, input_context, batch_size):
    """The training stream, from the input function the Trainer uses."""
    data = self.config.data
    if self.name == 'resnet20':
      return synthetic_images.dataset(
          'train', input_context=input_context, batch_size=batch_size,
          training=True, seed=SEED, image_size=data.image_size,
          num_classes=self.config.model.num_classes,
          num_examples=data.synthetic_examples)
    return text.dataset('train', source=text.Source.from_config(data),
                        seq_len=self.config.model.seq_len,
                        input_context=input_context, batch_size=batch_size,
                        seed=SEED)

  def per_example_loss(self, labels, logits):
    """Cross-entropy per image, or per sequence (mean over its tokens)."""
    loss = tf.keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None)(labels, logits)
    return loss if loss.shape.rank == 1 else tf.reduce_mean(loss, axis=-1)

  def keras_optimizer(self, variables):
    """A plain Keras optimizer with the config's hyper-parameters.

    Keras' CosineDecay with a linear warmup from 0 and alpha = the end
    factor computes what trainer/optimization.py's WarmupDecay does; weight
    decay skips the same variables; clipping is Keras' `global_clipnorm`.
    """
    opt = self.config.optimizer
    if opt.schedule != 'cosine':
      raise ValueError(f'{self.name}: schedule {opt.schedule!r} is not '
                       'replayed here')
    schedule = tf.keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, warmup_target=opt.learning_rate,
        warmup_steps=opt.warmup_steps,
        decay_steps=self.config.train.steps - opt.warmup_steps,
        alpha=opt.get('end_learning_rate_factor', 0.0))
    clip = self.config.train.clip_norm or None
    if opt.name == 'sgd':
      optimizer = tf.keras.optimizers.SGD(
          learning_rate=schedule, momentum=opt.momentum,
          nesterov=opt.nesterov, weight_decay=opt.weight_decay or None,
          global_clipnorm=clip)
    elif opt.name == 'adamw':
      optimizer = tf.keras.optimizers.AdamW(
          learning_rate=schedule, beta_1=opt.beta_1, beta_2=opt.beta_2,
          weight_decay=opt.weight_decay, global_clipnorm=clip)
    else:
      raise ValueError(f'{self.name}: optimizer {opt.name!r} is not replayed')
    excluded = [v for v in variables
                if any(p in v.path for p in opt.weight_decay_exclude)]
    optimizer.exclude_from_weight_decay(var_list=excluded)
    return optimizer


def get_workload(name: str) -> Workload:
  """The benchmarked model `name` ('resnet20' or 'lm')."""
  if name == 'resnet20':
    return Workload(
        name, config_file='configs/cifar_resnet20.py', variant='synthetic',
        config=cifar_resnet20.get_config('synthetic'), steps=6, xla_steps=4,
        title='ResNet-20 (configs/cifar_resnet20.py:synthetic): 32x32x3 '
        'synthetic images, 10 classes, batch 128, SGD momentum')
  return Workload(
      name, config_file='configs/lm_transformer.py', variant='',
      config=lm_transformer.get_config(), steps=8, xla_steps=8,
      title='Transformer LM (configs/lm_transformer.py): stdlib bytes, '
      'sequence 128, batch 32, AdamW')


# Each method builder returns `run(steps) -> (mean loss, wall seconds, CPU
# seconds)` of one call of `steps` optimizer steps. A call runs its steps in
# one tf.function (keras_fit: one epoch of one execution; its `steps` is fixed
# by steps_per_execution).


def trainer_method(workload, strategy, jit_compile=False):
  """The registered Trainer, called as trainer/controller.py calls it."""
  trainer = workload.trainer(strategy, jit_compile=jit_compile)
  iterator = iter(trainer.distribute_dataset('train',
                                             batch_size=workload.batch))
  every = workload.config.summary.input_wait_every_loops  # 10 in both.
  calls = [0]

  def run(steps):
    wall, cpu = time.perf_counter(), time.process_time()
    # As the Controller does: the input wait is measured on one inner loop
    # in `every` (the 2nd, 12th, ...). `steps` goes in as a tensor: no
    # retrace for a different count.
    metrics = trainer.train(iterator, steps,
                            measure_input_wait=calls[0] % every == 1)
    calls[0] += 1
    return (metrics['loss'], time.perf_counter() - wall,
            time.process_time() - cpu)
  return run


def bare_method(workload, strategy):
  """The tutorial's custom loop, as an engineer would write it by hand."""
  with strategy.scope():
    model = workload.build_model()
    optimizer = workload.keras_optimizer(model.trainable_variables)
    # Built eagerly: slots created inside the traced step fail under
    # MirroredStrategy (keras#23085); harmless under the default strategy.
    optimizer.build(model.trainable_variables)
    train_loss = tf.keras.metrics.Mean(name='train_loss')
    train_accuracy = tf.keras.metrics.SparseCategoricalAccuracy(
        name='train_accuracy')
  batch_size = workload.batch
  dataset = strategy.distribute_datasets_from_function(
      lambda ctx: workload.dataset(ctx, ctx.get_per_replica_batch_size(
          batch_size)))
  iterator = iter(dataset)

  def step(batch):
    inputs, labels = batch
    with tf.GradientTape() as tape:
      logits = model(inputs, training=True)
      per_example_loss = workload.per_example_loss(labels, logits)
      loss = tf.nn.compute_average_loss(per_example_loss,
                                        global_batch_size=batch_size)
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    train_loss.update_state(per_example_loss)
    train_accuracy.update_state(labels, logits)

  @tf.function
  def train_loop(iterator, num_steps):
    for _ in tf.range(num_steps):
      strategy.run(step, args=(next(iterator),))

  def run(steps):
    wall, cpu = time.perf_counter(), time.process_time()
    train_loop(iterator, tf.constant(steps))
    loss = float(train_loss.result())
    _ = float(train_accuracy.result())
    train_loss.reset_state()
    train_accuracy.reset_state()
    return loss, time.perf_counter() - wall, time.process_time() - cpu
  return run


class _EpochTimer(tf.keras.callbacks.Callback):
  """Wall and CPU seconds of each epoch of a fit: the train function's call
  and its logs, without fit's per-call set-up (data adapter, iterator,
  callbacks), which a real run pays once."""

  def __init__(self):
    super().__init__()
    self.wall, self.cpu, self._start = [], [], None

  def on_epoch_begin(self, epoch, logs=None):
    self._start = (time.perf_counter(), time.process_time())

  def on_epoch_end(self, epoch, logs=None):
    self.wall.append(time.perf_counter() - self._start[0])
    self.cpu.append(time.process_time() - self._start[1])


def keras_fit_method(workload, strategy):
  """Keras fit, one epoch (one execution of n steps) per call."""
  with strategy.scope():
    model = workload.build_model()
    model.compile(
        optimizer=workload.keras_optimizer(model.trainable_variables),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=['accuracy'], steps_per_execution=workload.steps,
        jit_compile=False)  # What 'auto' picks on a CPU-only host anyway.
  # Global batches from one pipeline; the in-memory data is generated or
  # read once and cached, so fit's fresh iterator per call starts at once.
  dataset = workload.dataset(tf.distribute.InputContext(), workload.batch)
  setup = []

  def run(steps):
    assert steps == workload.steps, (steps, workload.steps)
    timer = _EpochTimer()
    start = time.perf_counter()
    history = model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0,
                        callbacks=[timer])
    setup.append(time.perf_counter() - start - timer.wall[0])
    return history.history['loss'][-1], timer.wall[0], timer.cpu[0]
  run.setup = setup
  return run

