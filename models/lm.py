"""Language-model trainer: a byte-level decoder-only Transformer.

Batches are (inputs, targets) int32 [B, seq_len] from input/text.py, targets
being the inputs shifted by one byte. The loss of a sequence is the mean over
its positions of the next-byte cross-entropy (nats). Every sequence has the
same length, so the Trainer's global-batch mean of these per-sequence losses
is exactly the mean per-byte loss, and `bits_per_byte` (the same value / ln 2)
is the usual compression measure: 8 for a uniform guess, ~4.9 for the byte
frequencies of Python source, lower the more context the model uses.
"""

import math

import tensorflow as tf

from input import text
from models import transformer
from trainer import registry
from trainer.errors import UserError
from trainer.trainer import Trainer


@registry.register('lm')
class LMTrainer(Trainer):
  """Next-byte cross-entropy; reports accuracy and bits_per_byte."""

  metric_names = ('accuracy', 'bits_per_byte')

  def __init__(self, *, config, strategy):
    seq_len = config.model.seq_len
    if not isinstance(seq_len, int) or seq_len < 1:
      raise UserError(f'config key model.seq_len={seq_len!r} must be a '
                      'positive integer')
    self.source = text.Source.from_config(config.data)
    split = config.eval.get('split', 'test')
    if split != 'test':  # 'train' repeats forever: an eval would not end.
      raise UserError(f'config key eval.split={split!r} cannot be evaluated '
                      "for text data; use 'test' (the held-out files)")
    # Read both streams now (cached for dataset()): a bad data.files or an
    # empty split must stop the run before model_dir is written.
    for name in text.SPLITS:
      text.check_length(self.source, name, seq_len)
    super().__init__(config=config, strategy=strategy)

  def build_model(self):
    model = self.config.model
    if model.positions not in transformer.POSITIONS:
      raise UserError(f'config key model.positions={model.positions!r} is '
                      f'unknown; valid: {", ".join(transformer.POSITIONS)}')
    if model.width % model.heads:
      raise UserError(f'config key model.heads={model.heads} must divide '
                      f'model.width={model.width}; change either')
    try:
      return transformer.build_transformer_lm(
          vocab_size=text.VOCAB_SIZE, seq_len=model.seq_len,
          width=model.width, depth=model.depth, num_heads=model.heads,
          mlp_ratio=model.get('mlp_ratio', 4), positions=model.positions,
          tie_embeddings=model.tie_embeddings, dropout=model.dropout)
    except ValueError as e:  # E.g. an odd head size with rotary positions.
      raise UserError(f'config keys model.width/heads/positions: {e}') from e

  def dataset(self, split, input_context, batch_size):
    return text.dataset(split, source=self.source,
                        seq_len=self.config.model.seq_len,
                        input_context=input_context, batch_size=batch_size,
                        seed=self.config.seed)

  def _token_loss(self, batch, outputs):
    # float32 whatever the policy: the builder already returns float32
    # logits; the cast is a no-op then and a guard for other models.
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=batch[1], logits=tf.cast(outputs, tf.float32))  # [B, T]

  def compute_loss(self, batch, outputs):
    return tf.reduce_mean(self._token_loss(batch, outputs), axis=-1)

  def compute_metrics(self, batch, outputs):
    predictions = tf.argmax(outputs, axis=-1, output_type=tf.int32)
    correct = tf.cast(tf.equal(predictions, batch[1]), tf.float32)
    # Recomputed rather than passed from compute_loss; the graph optimizer
    # merges the identical ops, so it costs nothing.
    loss = self.compute_loss(batch, outputs)
    return {'accuracy': tf.reduce_mean(correct, axis=-1),
            'bits_per_byte': loss / math.log(2.0)}

  def serving_input_signature(self):
    return [tf.TensorSpec([None, self.config.model.seq_len], tf.int32,
                          name='input_0')]
