"""Image classification trainer: CIFAR ResNets and ResNet-50 on images.

Data (`data.name`): 'tfrecord' reads ImageNet-format TFRecords
(input/imagenet.py: `data.train_pattern`, `data.eval_pattern`), 'synthetic'
a cached pool of generated images (input/synthetic_images.py). Models
(`model.name`): resnet8/20/32/44/56/110 (CIFAR, models.resnet) or resnet50.
Logits are float32 under any `train.precision`: the ResNets' last layer
computes in float32 whatever the Keras dtype policy.
"""

import numpy as np
import tensorflow as tf

from input import imagenet, synthetic_images
from models import resnet
from trainer.experiment import registry
from trainer import actions as actions_lib
from trainer import schema
from trainer.errors import UserError
from trainer.trainer import Trainer

DATA = ('tfrecord', 'synthetic')
CIFAR_DEPTHS = (8, 20, 32, 44, 56, 110)
MODELS = tuple(f'resnet{d}' for d in CIFAR_DEPTHS) + ('resnet50',)
SPLITS = ('train', 'eval')
EXAMPLE_IMAGES = 8  # Written to the Images tab after each eval.


@registry.register('image_classifier')
class ImageClassifierTrainer(Trainer):
  """Softmax cross-entropy (optional label smoothing); accuracy, top-5."""

  def __init__(self, *, config, strategy):
    config = schema.resolve(config)  # Framework keys read below.
    for key, value, valid in (('data.name', config.data.name, DATA),
                              ('model.name', config.model.name, MODELS)):
      if value not in valid:
        raise UserError(f'config key {key}={value!r} is unknown; valid: '
                        f'{", ".join(valid)}')
    if config.data.name == 'tfrecord':
      # Checked now, before main.py writes anything into model_dir.
      eval_split = config.eval.split
      if eval_split not in SPLITS:
        raise UserError(f'config key eval.split={eval_split!r} names no '
                        f"TFRecord split; valid: {', '.join(SPLITS)}")
      imagenet.check(
          {f'data.{s}_pattern': config.data[f'{s}_pattern'] for s in SPLITS},
          shard_policy=config.data.shard_policy, augment=config.data.augment,
          num_pipelines=_input_pipelines(strategy, config))
    self.num_classes = config.model.num_classes
    self.metric_names = ('accuracy',) + (
        ('top5_accuracy',) if self.num_classes > 5 else ())
    super().__init__(config=config, strategy=strategy)

  def build_model(self):
    model, size = self.config.model, self.config.data.image_size
    common = dict(num_classes=self.num_classes, input_shape=(size, size, 3),
                  sync_batch_norm=model.sync_batch_norm,
                  bn_momentum=model.bn_momentum)
    if model.name == 'resnet50':
      return resnet.build_resnet50(**common)
    return resnet.build_cifar_resnet(depth=int(model.name[len('resnet'):]),
                                     base_filters=model.base_filters, **common)

  def dataset(self, split, input_context, batch_size):
    data = self.config.data
    common = dict(input_context=input_context, batch_size=batch_size,
                  training=split == 'train', seed=self.config.seed,
                  image_size=data.image_size)
    if data.name == 'synthetic':
      return synthetic_images.dataset(
          split, num_classes=self.num_classes,
          num_examples=data.synthetic_examples, **common)
    return imagenet.dataset(
        split, file_pattern=data[f'{split}_pattern'],
        shard_policy=data.shard_policy, shuffle_buffer=data.shuffle_buffer,
        augment=data.augment, crop_padding=data.eval_crop_padding,
        label_offset=data.label_offset, num_classes=self.num_classes, **common)

  def compute_loss(self, batch, outputs):
    smoothing = self.config.model.get('label_smoothing', 0.0)
    if not smoothing:
      return tf.keras.losses.sparse_categorical_crossentropy(
          batch[1], outputs, from_logits=True)
    return tf.keras.losses.categorical_crossentropy(
        tf.one_hot(batch[1], self.num_classes), outputs, from_logits=True,
        label_smoothing=smoothing)

  def compute_metrics(self, batch, outputs):
    labels = batch[1][:, None]
    top = tf.math.top_k(outputs, k=min(5, self.num_classes)).indices
    hits = tf.cast(tf.equal(top, labels), tf.float32)
    metrics = {'accuracy': hits[:, 0]}
    if 'top5_accuracy' in self.metric_names:
      metrics['top5_accuracy'] = tf.reduce_sum(hits, axis=1)
    return metrics

  def actions(self):
    return [actions_lib.Action(self.write_examples, after_eval=True,
                               name='eval_images')]

  def write_examples(self, context):
    """After each eval: the first eval images with their predicted and true
    labels (TensorBoard's Images tab; the labels in the description)."""
    images, labels = next(iter(self.dataset(
        self.config.eval.split, tf.distribute.InputContext(), EXAMPLE_IMAGES)))
    with self.ema_weights():
      predicted = np.argmax(self.model(images, training=False), axis=-1)
    pixels = np.asarray(images) * imagenet.STDDEV_RGB + imagenet.MEAN_RGB
    pixels = np.clip(pixels / 255.0, 0.0, 1.0)
    lines = [f'{i}: predicted {p}, true {t}{"" if p == t else " (wrong)"}'
             for i, (p, t) in enumerate(zip(predicted, np.asarray(labels)))]
    context.writer.write_images(
        context.step, {'eval/examples': pixels},
        {'eval/examples': '  \n'.join(lines)})


def _input_pipelines(strategy, config) -> int:
  """Input pipelines the strategy will make: one per worker (host)."""
  resolver = strategy.cluster_resolver
  if config.data.pipeline == 'global' or resolver is None:
    return 1
  jobs = resolver.cluster_spec().as_dict()
  return max(1, len(jobs.get('worker', [])) + len(jobs.get('chief', [])))
