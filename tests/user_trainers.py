"""Trainers as a user writes them, outside models/: the paths off the built-in
step that must stay exact (tests/trainer/apply_paths_test.py and
tests/multiworker_test.py run them; configs in tests/user_config.py).

Data: token sequences of uneven length. Each example is SEQ_LEN tokens of
FEATURES floats, of which the first `length` are real (1..SEQ_LEN) and the
rest padding; the label of a real token is a fixed linear function of its
features. Replicas therefore hold different numbers of real tokens.
"""

import json
import math
import os
import signal
import sys
import time

import numpy as np
import tensorflow as tf

from input import pipeline
from models import classifier
from trainer import actions as actions_lib
from trainer import optimization
from trainer.parts import sharding
from trainer.trainer import Trainer

SPLITS = ('train', 'test')

SEQ_LEN, FEATURES, CLASSES = 6, 8, 4
NUM_EXAMPLES = 512


def sequence_arrays(split: str, seed: int):
  """(tokens float32 [N, T, F], labels int32 [N, T], mask float32 [N, T])."""
  rng = np.random.RandomState(seed + (split != 'train'))
  tokens = rng.normal(size=(NUM_EXAMPLES, SEQ_LEN, FEATURES)).astype(np.float32)
  teacher = np.random.RandomState(seed).normal(size=(FEATURES, CLASSES))
  labels = np.argmax(tokens @ teacher, axis=-1).astype(np.int32)
  lengths = rng.randint(1, SEQ_LEN + 1, size=NUM_EXAMPLES)
  mask = (np.arange(SEQ_LEN)[None, :] < lengths[:, None]).astype(np.float32)
  return tokens * mask[..., None], labels, mask


class SequenceTrainer(Trainer):
  """Per-token classification with padding: a weighted per-example loss."""

  metric_names = ('accuracy',)

  def build_model(self):
    return tf.keras.Sequential([
        tf.keras.Input((SEQ_LEN, FEATURES)),
        tf.keras.layers.Dense(16, activation='relu', name='hidden'),
        tf.keras.layers.Dense(CLASSES, name='logits')], name='sequence_model')

  def dataset(self, split, input_context, batch_size):
    if split not in SPLITS:
      raise ValueError(f'no split {split!r}; this data has {SPLITS}')
    tokens, labels, mask = sequence_arrays(split, self.config.seed)
    examples = tf.data.Dataset.from_tensor_slices(
        {'tokens': tokens, 'labels': labels, 'mask': mask})
    return pipeline.finish(examples, input_context=input_context,
                           batch_size=batch_size, training=split == 'train',
                           seed=self.config.seed, num_examples=NUM_EXAMPLES)

  def forward(self, batch, training):
    return self.model(batch['tokens'], training=training)

  def compute_loss(self, batch, outputs):
    # Each sequence's mean loss over its real tokens, weighted by their
    # number: the global mean is the mean over all real tokens.
    token_loss = tf.keras.losses.sparse_categorical_crossentropy(
        batch['labels'], outputs, from_logits=True) * batch['mask']
    tokens = tf.reduce_sum(batch['mask'], axis=-1)
    return tf.reduce_sum(token_loss, axis=-1) / tokens, tokens

  def compute_metrics(self, batch, outputs):
    correct = tf.cast(tf.argmax(outputs, -1, output_type=tf.int32) ==
                      batch['labels'], tf.float32) * batch['mask']
    tokens = tf.reduce_sum(batch['mask'], axis=-1)
    return {'accuracy': (tf.reduce_sum(correct, axis=-1) / tokens, tokens)}


class TutorialStep:
  """The tutorial train step, mixed into a Trainer: its own tape, the loss
  scaled by the global batch, then the optimizer's own apply_gradients
  (Keras sums across replicas), bypassing Trainer.apply_gradients."""

  def train_step(self, batch):
    with tf.GradientTape() as tape:
      outputs = self.forward(batch, training=True)
      per_example = self.compute_loss(batch, outputs)
      loss = tf.nn.compute_average_loss(
          per_example, global_batch_size=self.global_batch_size)
    variables = self.variables_to_train()
    grads = tape.gradient(loss, variables)
    self.optimizer.apply_gradients(zip(grads, variables))
    return {'loss': per_example, **self.compute_metrics(batch, outputs)}

  def variables_to_train(self):
    return self.trainable_variables


class TutorialTrainer(TutorialStep, SequenceTrainer):
  """The tutorial pattern on the sequence model (unweighted losses)."""

  def compute_loss(self, batch, outputs):  # Unweighted: per-token means.
    loss, _ = super().compute_loss(batch, outputs)
    return loss

  def compute_metrics(self, batch, outputs):
    accuracy, _ = super().compute_metrics(batch, outputs)['accuracy']
    return {'accuracy': accuracy}


class WeightedTutorialTrainer(SequenceTrainer):
  """The tutorial pattern with a weighted loss (padded tokens weigh 0), as
  docs/writing-a-trainer.md writes it: divided by the global weight sum."""

  def train_step(self, batch):
    with tf.GradientTape() as tape:
      outputs = self.forward(batch, training=True)
      values, weights = self.compute_loss(batch, outputs)  # ([B], [B])
      # The weight sum of the global batch: every replica and worker.
      total = tf.distribute.get_replica_context().all_reduce(
          tf.distribute.ReduceOp.SUM, tf.reduce_sum(weights))
      loss = tf.math.divide_no_nan(tf.reduce_sum(values * weights), total)
    grads = tape.gradient(loss, self.trainable_variables)
    self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
    return {'loss': (values, weights), **self.compute_metrics(batch, outputs)}


class ModelVariablesTutorial(TutorialTrainer):
  """The tutorial pattern as Keras tutorials write it: the model's own
  trainable_variables (refused once a weight is held in pieces)."""

  def variables_to_train(self):
    return self.model.trainable_variables


class TwoOptimizerTrainer(SequenceTrainer):
  """A GAN-like step: the hidden layer and the output layer are updated by
  two optimizers from the factory, one through the Trainer's explicit
  all-reduce, one through Keras' own apply_gradients."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    with self.strategy.scope():
      self.second = optimization.build_optimizer(
          self.config.optimizer, total_steps=self.config.train.steps)
      # A layer's variables to update: its weights, or their pieces under
      # --strategy=parameter_server with train.variable_shard_bytes.
      self.second.build(sharding.trainable_variables(
          self.model.get_layer('logits')))

  def train_step(self, batch):
    grads, loss, values = self.compute_gradients(batch)
    hidden = sharding.trainable_variables(self.model.get_layer('hidden'))
    logits = sharding.trainable_variables(self.model.get_layer('logits'))
    self.apply_gradients(grads[:len(hidden)], hidden, loss=loss)
    self.second.apply_gradients(zip(grads[len(hidden):], logits))
    return values

  def checkpoint_items(self, model_only=False):
    items = super().checkpoint_items(model_only)
    if not model_only:
      items['second_optimizer'] = self.second
    return items


class SecondOptimizerOutsideScope(TwoOptimizerTrainer):
  """The second optimizer made and built outside the strategy's scope."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.second = optimization.build_optimizer(
        self.config.optimizer, total_steps=self.config.train.steps)
    self.second.build(self.model.get_layer('logits').trainable_variables)


class SecondOptimizerNotCheckpointed(TwoOptimizerTrainer):
  checkpoint_items = SequenceTrainer.checkpoint_items  # Not extended.


class SecondOptimizerApplyTrainer(TwoOptimizerTrainer):
  """Both optimizers through self.apply_gradients (two explicit all-reduces)."""

  def train_step(self, batch):
    grads, loss, values = self.compute_gradients(batch)
    hidden = sharding.trainable_variables(self.model.get_layer('hidden'))
    logits = sharding.trainable_variables(self.model.get_layer('logits'))
    self.apply_gradients(grads[:len(hidden)], hidden, loss=loss)
    self.apply_gradients(grads[len(hidden):], logits, optimizer=self.second)
    return values


class SyncNormTrainer(SequenceTrainer):
  """Synchronized batch norm between the layers (use with accumulation)."""

  def build_model(self):
    return tf.keras.Sequential([
        tf.keras.Input((SEQ_LEN, FEATURES)),
        tf.keras.layers.Dense(16, name='hidden'),
        tf.keras.layers.BatchNormalization(synchronized=True, momentum=0.5,
                                           name='norm'),
        tf.keras.layers.ReLU(),
        tf.keras.layers.Dense(CLASSES, name='logits')], name='norm_model')


class UnsyncedNormTrainer(SequenceTrainer):
  """Per-replica batch norm, Keras' default: each replica's copy of the
  moving statistics follows its own slice of the batch."""

  def build_model(self):
    return tf.keras.Sequential([
        tf.keras.Input((SEQ_LEN, FEATURES)),
        tf.keras.layers.Dense(16, name='hidden'),
        tf.keras.layers.BatchNormalization(momentum=0.5, name='norm'),
        tf.keras.layers.ReLU(),
        tf.keras.layers.Dense(CLASSES, name='logits')], name='norm_model')


# -----------------------------------------------------------------------------
# Mistakes a user makes, one per class: each must stop the run before it
# writes anything, with one line naming the method
# (tests/trainer/experiment/validation_test.py).


class ScalarLoss(SequenceTrainer):

  def compute_loss(self, batch, outputs):
    loss, tokens = super().compute_loss(batch, outputs)
    return tf.reduce_sum(loss * tokens) / tf.reduce_sum(tokens)


class MisnamedMetric(SequenceTrainer):
  metric_names = ('acc',)


class TrainStepWithoutReturn(SequenceTrainer):

  def train_step(self, batch):
    grads, loss, _ = self.compute_gradients(batch)
    self.apply_gradients(grads, self.trainable_variables, loss=loss)


class ForwardWithoutReturn(SequenceTrainer):

  def forward(self, batch, training):
    self.model(batch['tokens'], training=training)


class ForwardNoneInEval(SequenceTrainer):
  """Returns only on the training branch: the evaluation's forward gives
  None, which validation finds when it traces the eval loop."""

  def forward(self, batch, training):
    outputs = self.model(batch['tokens'], training=training)
    if training:
      return outputs


class LayerOutsideModel(SequenceTrainer):
  """A layer kept on the Trainer, outside self.model: built at its first
  call, inside the traced step; neither trained nor checkpointed."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.extra = tf.keras.layers.Dense(CLASSES, name='extra')

  def forward(self, batch, training):
    return self.extra(self.model(batch['tokens'], training=training))


class RunningMeanOutsideCheckpoint(SequenceTrainer):
  """A tf.Variable of its own (a running mean of the inputs, updated by its
  step and read by forward) that checkpoint_items() does not return: a
  resumed run or --mode=eval would read 0."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    with self.strategy.scope():
      self.input_mean = tf.Variable(
          0.0, trainable=False, aggregation=tf.VariableAggregation.MEAN,
          synchronization=tf.VariableSynchronization.ON_WRITE)

  def train_step(self, batch):
    self.input_mean.assign(0.9 * self.input_mean +
                           0.1 * tf.reduce_mean(batch['tokens']))
    return super().train_step(batch)

  def forward(self, batch, training):
    return self.model(batch['tokens'] - self.input_mean, training=training)


class RunningMeanCheckpointed(RunningMeanOutsideCheckpoint):
  """The same, returned by checkpoint_items() (model_only too: forward
  reads it): saved, restored and evaluated with."""

  def checkpoint_items(self, model_only=False):
    return dict(super().checkpoint_items(model_only),
                input_mean=self.input_mean)


class ScaleOutsideModel(SequenceTrainer):
  """A trainable tf.Variable on the Trainer, in a module of its own: the
  default step would neither train nor save it."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    with self.strategy.scope():
      self.scales = tf.Module()
      self.scales.temperature = tf.Variable(1.0, name='temperature')

  def forward(self, batch, training):
    return (self.model(batch['tokens'], training=training) /
            self.scales.temperature)


class ForgetsSuperInit(SequenceTrainer):
  """An __init__ of its own that never calls Trainer's."""

  def __init__(self, **kwargs):  # pylint: disable=super-init-not-called
    self.scale = 2.0


class KeepsEncoderView(SequenceTrainer):
  """Keeps a Model over self.model's own first layer (for serving, say): not
  in the checkpoint itself, but its weights are."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.encoder = tf.keras.Model(self.model.inputs,
                                  self.model.get_layer('hidden').output)


class FrozenTeacher(SequenceTrainer):
  """Keeps a frozen layer (a teacher, loaded each run): trains nothing."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.teacher = tf.keras.layers.Dense(CLASSES, name='teacher')
    self.teacher.build((None, SEQ_LEN, FEATURES))
    self.teacher.trainable = False


class LayersInAList(SequenceTrainer):
  """A subclassed model keeping its layers in a list: Keras 3 does not track
  them for tf.train.Checkpoint."""

  def build_model(self):

    class Blocks(tf.keras.Model):

      def __init__(self):
        super().__init__()
        self.blocks = [tf.keras.layers.Dense(16, activation='relu'),
                       tf.keras.layers.Dense(CLASSES)]

      def call(self, x):
        for block in self.blocks:
          x = block(x)
        return x

    model = Blocks()
    model(tf.zeros([1, SEQ_LEN, FEATURES]))
    return model

  def serving_input_signature(self):
    return [tf.TensorSpec([None, SEQ_LEN, FEATURES], tf.float32)]


class DefaultForward(SequenceTrainer):
  """Dict batches, but the default forward (batch[0])."""
  forward = Trainer.forward


class FiniteTrainSplit(SequenceTrainer):

  def dataset(self, split, input_context, batch_size):
    tokens, labels, mask = sequence_arrays(split, self.config.seed)
    return tf.data.Dataset.from_tensor_slices(
        {'tokens': tokens, 'labels': labels, 'mask': mask}).batch(
            batch_size, drop_remainder=True)


class EmptyEvalSplit(SequenceTrainer):

  def dataset(self, split, input_context, batch_size):
    dataset = super().dataset(split, input_context, batch_size)
    return dataset if split == 'train' else dataset.take(0)


class RepeatedEvalSplit(SequenceTrainer):
  """Every split repeated, as a train pipeline is: an evaluation would
  never end."""

  def dataset(self, split, input_context, batch_size):
    return super().dataset(split, input_context, batch_size).repeat()


class LongEvalSplit(SequenceTrainer):
  """Its eval split is read $DISTLOOP_TEST_EVAL_REPEATS times over (a long
  evaluation: one tf.function call, which no signal handler interrupts)."""

  def dataset(self, split, input_context, batch_size):
    dataset = super().dataset(split, input_context, batch_size)
    if split == 'train':
      return dataset
    return dataset.repeat(int(os.environ.get('DISTLOOP_TEST_EVAL_REPEATS',
                                             '1')))


class LongEvalGathered(LongEvalSplit):
  """LongEvalSplit whose evaluation gathers outputs: batch by batch from the
  host, not one tf.function call."""

  def eval_outputs(self, batch, outputs):
    return {'predicted': tf.argmax(outputs, -1)}

  def aggregate(self, outputs):
    return {'gathered_rows': sum(len(v) for v in outputs.values())}


class RaisesInComputeLoss(SequenceTrainer):

  def compute_loss(self, batch, outputs):
    return batch['labelz']  # A typo: KeyError while the step is traced.


class RaisesInBuildModel(SequenceTrainer):

  def build_model(self):
    raise ValueError('width must be even, got 5')


class SigtermInBuildModel(SequenceTrainer):
  """Gets SIGTERM while its model is being built (a preemption at
  start-up), inside the code whose errors become one-line UserErrors."""

  def build_model(self):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # The guard raises here.
    return super().build_model()


class SigtermInDataset(SequenceTrainer):
  """Gets SIGTERM in dataset(), which validation calls before training."""

  def dataset(self, split, input_context, batch_size):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
    return super().dataset(split, input_context, batch_size)


class ReadsMissingKey(SequenceTrainer):
  """Reads a model key its config does not have (tests/user_config.py's
  model section is empty)."""

  def build_model(self):
    if self.config.model.use_bn:
      raise AssertionError('unreachable: the config has no use_bn')
    return super().build_model()


class ReadsMissingKeyInStep(SequenceTrainer):
  """Reads a key the train section does not have, while the step traces."""

  def compute_loss(self, batch, outputs):
    loss, tokens = super().compute_loss(batch, outputs)
    return loss * self.config.train.loss_weight, tokens


class IgnoresBatchSize(SequenceTrainer):
  """Batches by a config value instead of its batch_size argument."""

  def dataset(self, split, input_context, batch_size):
    return super().dataset(split, input_context,
                           self.config.eval.global_batch_size)


class BatchesByContext(SequenceTrainer):
  """Batches by the config's global batch, divided by TensorFlow's own
  input_context.get_per_replica_batch_size: right under data.pipeline
  'per_host' (one replica's batch) and 'global' (a context of one replica:
  the global batch, which the strategy splits)."""

  def dataset(self, split, input_context, batch_size):
    section = self.config.train if split == 'train' else self.config.eval
    return super().dataset(split, input_context,
                           input_context.get_per_replica_batch_size(
                               section.global_batch_size))


class RepeatsPartialBatches(SequenceTrainer):
  """20 examples batched by 32 without drop_remainder, then repeated."""

  def dataset(self, split, input_context, batch_size):
    examples = super().dataset(split, input_context, batch_size).unbatch()
    return examples.take(20).batch(batch_size).repeat()


class PartialBatchEachEpoch(SequenceTrainer):
  """40 examples batched by 32 without drop_remainder, then repeated: the
  first batch is whole, every second one has 8 examples."""

  def dataset(self, split, input_context, batch_size):
    examples = super().dataset(split, input_context, batch_size).unbatch()
    if split != 'train':
      return examples.batch(batch_size)
    return examples.take(40).batch(batch_size).repeat()


class MapLosesBatchDim(SequenceTrainer):
  """Batched with drop_remainder=True, then a map through numpy that
  leaves the mask's first dimension unknown: the batch size is still
  fixed."""

  def dataset(self, split, input_context, batch_size):
    def through_numpy(batch):
      mask = tf.numpy_function(lambda m: m, [batch['mask']], tf.float32)
      mask.set_shape([None, SEQ_LEN])
      return dict(batch, mask=mask)
    return super().dataset(split, input_context, batch_size).map(through_numpy)


class Unbatched(SequenceTrainer):
  """Examples, not batches: from_tensor_slices without .batch()."""

  def dataset(self, split, input_context, batch_size):
    tokens, labels, mask = sequence_arrays(split, self.config.seed)
    examples = tf.data.Dataset.from_tensor_slices(
        {'tokens': tokens, 'labels': labels, 'mask': mask})
    return examples.repeat() if split == 'train' else examples


class UnbatchedPairs(SequenceTrainer):
  """(features, label) examples, not batches: the label is a scalar."""

  def dataset(self, split, input_context, batch_size):
    tokens, labels, _ = sequence_arrays(split, self.config.seed)
    examples = tf.data.Dataset.from_tensor_slices((tokens[:, 0], labels[:, 0]))
    return examples.repeat() if split == 'train' else examples


class EndsUnseen(SequenceTrainer):
  """A train split that ends, of a length tf.data cannot count (a filter):
  found only when it runs out."""

  def dataset(self, split, input_context, batch_size):
    tokens, labels, mask = sequence_arrays(split, self.config.seed)
    return tf.data.Dataset.from_tensor_slices(
        {'tokens': tokens, 'labels': labels, 'mask': mask}).filter(
            lambda example: True).batch(batch_size, drop_remainder=True)


class SlowEval(SequenceTrainer):
  """An evaluation that takes seconds (a sleep per batch): a window for a
  SIGTERM after training."""

  def dataset(self, split, input_context, batch_size):
    dataset = super().dataset(split, input_context, batch_size)
    if split == 'train':
      return dataset

    def slow(batch):
      def sleep():
        print('slow eval batch', file=sys.stderr, flush=True)
        time.sleep(0.3)
      tf.py_function(sleep, [], [])
      return batch
    return dataset.map(slow)


class KilledAtStep(classifier.ClassifierTrainer):
  """The digits classifier, sent SIGKILL by itself right after step
  $DISTLOOP_TEST_KILL_AT (when set): a real kill -9 at a known step, for the
  goodput's count of lost steps (tests/resume_test.py).

  $DISTLOOP_TEST_KILL_SIGNAL=SIGTERM sends that signal instead, and
  $DISTLOOP_TEST_KILL_WORKER=I only to worker I of a TF_CONFIG cluster: a
  preemption of one worker between two inner loops.
  """

  def actions(self):
    at = os.environ.get('DISTLOOP_TEST_KILL_AT')
    if not at:
      return []
    signum = signal.Signals[os.environ.get('DISTLOOP_TEST_KILL_SIGNAL',
                                           'SIGKILL')]
    worker = os.environ.get('DISTLOOP_TEST_KILL_WORKER')
    if worker is not None:
      task = json.loads(os.environ['TF_CONFIG'])['task']
      if task['index'] != int(worker):
        return []

    def kill(context):
      if context.step == int(at):
        os.kill(os.getpid(), signum)
    return [actions_lib.Action(kill, every_steps=int(at), name='kill',
                               everywhere=True)]


class TutorialKilledAtStep(TutorialStep, KilledAtStep):
  """KilledAtStep with the tutorial step."""


class SubclassedModel(classifier.ClassifierTrainer):
  """The digits classifier as a subclassed Keras model (built by one call),
  which has no static inputs for the default serving signature."""

  def build_model(self):
    class Net(tf.keras.Model):

      def __init__(self, hidden: int, classes: int):
        super().__init__()
        self.hidden = tf.keras.layers.Dense(hidden, activation='relu')
        self.logits = tf.keras.layers.Dense(classes)

      def call(self, inputs):
        return self.logits(self.hidden(inputs))
    model = Net(64, self.config.model.num_classes)
    model(tf.zeros([1, self.config.model.input_dim]))
    return model


# What a Trainer returns wrong, each refused in one line before the run
# (tests/trainer/experiment/validation_test.py).


class ScalarEvalOutput(SequenceTrainer):

  def eval_outputs(self, batch, outputs):
    return {'mean_logit': tf.reduce_mean(outputs)}  # A batch mean.


class EvalOutputNotDict(SequenceTrainer):

  def eval_outputs(self, batch, outputs):
    return outputs


class EvalOutputsOptional(SequenceTrainer):
  """Gathers its predictions only when asked to; None (the documented
  "none") otherwise."""
  gather = False

  def eval_outputs(self, batch, outputs):
    if not self.gather:
      return None
    return {'predicted': tf.argmax(outputs, -1)}

  def aggregate(self, outputs):
    return {'gathered_rows': sum(len(v) for v in outputs.values())}


class AggregateReturnsArray(SequenceTrainer):

  def eval_outputs(self, batch, outputs):
    return {'predicted': tf.argmax(outputs, -1)}  # [B, T]

  def aggregate(self, outputs):
    return {'predicted_all': outputs['predicted']}  # Not one number.


class AggregateRaises(AggregateReturnsArray):

  def aggregate(self, outputs):
    return {'count': outputs['prediction'].size}  # A misspelt key.


class DerivedMetricRaises(SequenceTrainer):

  def derived_metrics(self, metrics):
    return {'error': 1 - metrics['acuracy']}


class ZeroWeightMetric(SequenceTrainer):
  """A metric whose weights are all 0 (e.g. a rating absent from every
  example): its mean is undefined, in training and evaluation alike."""
  metric_names = ('accuracy', 'rated_error')

  def compute_metrics(self, batch, outputs):
    metrics = super().compute_metrics(batch, outputs)
    accuracy, tokens = metrics['accuracy']
    return {**metrics, 'rated_error': (1 - accuracy, tokens * 0)}

  def derived_metrics(self, metrics):
    return {'rated_error_pct': 100 * metrics['rated_error']}


class DerivedMetricOfValues(SequenceTrainer):
  """Fails only where the loss is 0.5, as the values validation makes up
  are: a real run trains."""

  def derived_metrics(self, metrics):
    return {'log_gap': math.log(abs(metrics['loss'] - 0.5))}


class NanLoss(SequenceTrainer):
  """Non-finite from the first step: the run stops before its first save."""

  def compute_loss(self, batch, outputs):
    loss, tokens = super().compute_loss(batch, outputs)
    return loss * float('nan'), tokens


class NanGradient(SequenceTrainer):
  """A finite loss whose gradient is NaN from the first step: sqrt at 0."""

  def compute_loss(self, batch, outputs):
    loss, tokens = super().compute_loss(batch, outputs)
    weight = self.model.trainable_variables[0]
    return loss + tf.sqrt(0.0 * tf.reduce_sum(weight)), tokens


def _logged(step):  # A decorator without functools.wraps: __name__ changes.
  def wrapper(self, batch):
    return step(self, batch)
  return wrapper


class DecoratedTrainStep(SequenceTrainer):
  train_step = _logged(SequenceTrainer.train_step)


class LossWithoutReturn(SequenceTrainer):

  def compute_loss(self, batch, outputs):
    super().compute_loss(batch, outputs)  # The return forgotten.


class MetricsAsList(SequenceTrainer):

  def compute_metrics(self, batch, outputs):
    return [super().compute_metrics(batch, outputs)['accuracy']]


class ModelIsALayer(SequenceTrainer):

  def build_model(self):
    return tf.keras.layers.Dense(4)


class MetricNamesString(SequenceTrainer):
  metric_names = 'accuracy'


class NoComputeLoss(SequenceTrainer):
  compute_loss = Trainer.compute_loss  # As if never written.


class WrongInputWidth(classifier.ClassifierTrainer):
  """The default forward on (inputs, labels) batches of 64 features, into
  a model built for 63."""

  def build_model(self):
    return tf.keras.Sequential([tf.keras.Input((63,)),
                                tf.keras.layers.Dense(10)])


class SignatureNotAList(classifier.ClassifierTrainer):

  def serving_input_signature(self):
    return tf.TensorSpec([None, 64], tf.float32)


class SignatureFewerThanServe(classifier.ClassifierTrainer):
  """One spec for a serve of two inputs (TensorFlow: a traceback)."""

  def serving_input_signature(self):
    return [tf.TensorSpec([None, 64], tf.float32)]

  def serve(self, features, scale):
    return {'outputs': self.model(features * scale, training=False)}


class SignatureTooNarrow(classifier.ClassifierTrainer):
  """A spec of 4 features for a model of 64: the default serve fails."""

  def serving_input_signature(self):
    return [tf.TensorSpec([None, 4], tf.float32, name='x')]


class SignatureMoreThanServe(classifier.ClassifierTrainer):

  def serving_input_signature(self):
    return [tf.TensorSpec([None, 64], tf.float32)] * 2

  def serve(self, features):
    return {'outputs': self.model(features, training=False)}


class ServeReturnsTuple(classifier.ClassifierTrainer):
  """Exported as output_0, output_1 by TensorFlow, were it let through."""

  def serve(self, features):
    logits = self.model(features, training=False)
    return logits, tf.nn.softmax(logits)


class ServeReturnsNestedDict(classifier.ClassifierTrainer):
  """TensorFlow refuses it, but only when the export saves it."""

  def serve(self, features):
    logits = self.model(features, training=False)
    return {'outputs': {'logits': logits}}


class ServeReturnsRagged(classifier.ClassifierTrainer):
  """A ragged output: a SavedModel signature may return one."""

  def serve(self, features):
    logits = self.model(features, training=False)
    return {'top': tf.RaggedTensor.from_tensor(logits, padding=0.0)}


class TwoHeadsDefaultServe(classifier.ClassifierTrainer):
  """A model with two outputs (a dict) and the default serve, which serves
  them under their own names."""

  def build_model(self):
    inputs = tf.keras.Input([64])
    hidden = tf.keras.layers.Dense(16, activation='relu')(inputs)
    return tf.keras.Model(inputs, {
        'logits': tf.keras.layers.Dense(10)(hidden),
        'score': tf.keras.layers.Dense(1)(hidden)})

  def forward(self, batch, training):
    features, _ = batch
    return self.model(features, training=training)['logits']


class EmbeddingTrainer(SequenceTrainer):
  """Token ids through an Embedding, whose gradient TensorFlow gives as
  tf.IndexedSlices: one row per token, a repeated id's rows apart."""

  def build_model(self):
    return tf.keras.Sequential([
        tf.keras.Input((SEQ_LEN,), dtype='int32'),
        tf.keras.layers.Embedding(FEATURES, 8, name='embedding'),
        tf.keras.layers.Dense(CLASSES, name='logits')], name='embedding_model')

  def forward(self, batch, training):
    ids = tf.argmax(batch['tokens'], -1, output_type=tf.int32)
    return self.model(ids, training=training)


class EmbeddingOwnStep(EmbeddingTrainer):
  """The tape's gradients, IndexedSlices as they come, to
  self.apply_gradients."""

  def train_step(self, batch):
    with tf.GradientTape() as tape:
      outputs = self.forward(batch, training=True)
      values, weights = self.compute_loss(batch, outputs)
      total = tf.distribute.get_replica_context().all_reduce(
          tf.distribute.ReduceOp.SUM, tf.reduce_sum(weights))
      loss = tf.math.divide_no_nan(tf.reduce_sum(values * weights), total)
    grads = tape.gradient(loss, self.trainable_variables)
    self.apply_gradients(grads, self.trainable_variables, loss=loss)
    return {'loss': (values, weights), **self.compute_metrics(batch, outputs)}
