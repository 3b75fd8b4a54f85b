"""Classifier trainer: an MLP on (features, labels) batches."""

import tensorflow as tf

from input import digits, synthetic
from models import mlp
from trainer.experiment import registry
from trainer.errors import UserError
from trainer.trainer import Trainer

DATASETS = {'digits': digits.dataset, 'synthetic': synthetic.dataset}


@registry.register('classifier')
class ClassifierTrainer(Trainer):
  """Softmax cross-entropy on integer labels; reports accuracy."""

  metric_names = ('accuracy',)

  def __init__(self, *, config, strategy):
    if config.data.name not in DATASETS:
      raise UserError(f'config key data.name={config.data.name!r} is unknown; '
                      f'valid: {", ".join(DATASETS)}')
    super().__init__(config=config, strategy=strategy)

  def build_model(self):
    return mlp.build_mlp(input_dim=self.config.model.input_dim,
                         hidden_sizes=self.config.model.hidden_sizes,
                         num_classes=self.config.model.num_classes,
                         dropout=self.config.model.get('dropout', 0.0))

  def dataset(self, split, input_context, batch_size):
    return DATASETS[self.config.data.name](
        split, input_context=input_context, batch_size=batch_size,
        training=split == 'train', seed=self.config.seed)

  def compute_loss(self, batch, outputs):
    return tf.keras.losses.sparse_categorical_crossentropy(
        batch[1], outputs, from_logits=True)

  def compute_metrics(self, batch, outputs):
    predictions = tf.argmax(outputs, axis=-1, output_type=tf.int32)
    return {'accuracy': tf.cast(tf.equal(predictions, batch[1]), tf.float32)}
