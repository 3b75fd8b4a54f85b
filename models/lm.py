"""Language-model trainer: a byte-level decoder-only Transformer.

Batches are (inputs, targets) int32 [B, seq_len] from input/text.py, targets
being the inputs shifted by one byte; a target of PAD (-1) marks padding,
which counts for nothing. The loss is a weighted per-example value (the
Trainer contract's (values, weights) pair): each sequence's mean next-byte
cross-entropy (nats) over its real tokens, weighted by their count, so the
Trainer's global mean is exactly the mean per-token loss over the global
batch however the padding falls across replicas, and `bits_per_byte` (the
same value / ln 2) is the usual compression measure: 8 for a uniform guess,
~4.9 for the byte frequencies of Python source, lower the more context the
model uses. The shipped text pipeline packs full windows (no padding).
"""

import math

import numpy as np
import tensorflow as tf

from input import text
from models import transformer
from trainer.experiment import registry
from trainer import actions as actions_lib
from trainer import schema
from trainer.errors import UserError
from trainer.trainer import Trainer

PAD = -1  # A target that is padding: no loss, no metric.
# After each eval, SAMPLE_BYTES sampled after the first SAMPLE_PROMPT bytes
# of the held-out text go to TensorBoard's Text tab.
SAMPLE_PROMPT, SAMPLE_BYTES = 32, 96


@registry.register('lm')
class LMTrainer(Trainer):
  """Next-byte cross-entropy; reports accuracy, bits_per_byte and the
  corpus perplexity; writes a text sample at each eval."""

  metric_names = ('accuracy', 'bits_per_byte')

  def __init__(self, *, config, strategy):
    config = schema.resolve(config)  # Framework keys read below.
    seq_len = config.model.seq_len
    if not isinstance(seq_len, int) or seq_len < 1:
      raise UserError(f'config key model.seq_len={seq_len!r} must be a '
                      'positive integer')
    self.source = text.Source.from_config(config.data)
    split = config.eval.split
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
    shard_bytes = model.get('embedding_shard_bytes', 0)
    row = 4 * model.width
    if not isinstance(shard_bytes, int) or shard_bytes < 0 or (
        0 < shard_bytes < row):
      raise UserError(f'config key model.embedding_shard_bytes={shard_bytes!r} '
                      f'must be 0 (the token table in one variable) or at '
                      f'least one row of it, {row} bytes (4 x model.width)')
    if model.width % model.heads:
      raise UserError(f'config key model.heads={model.heads} must divide '
                      f'model.width={model.width}; change either')
    try:
      return transformer.build_transformer_lm(
          vocab_size=text.VOCAB_SIZE, seq_len=model.seq_len,
          width=model.width, depth=model.depth, num_heads=model.heads,
          mlp_ratio=model.get('mlp_ratio', 4), positions=model.positions,
          tie_embeddings=model.tie_embeddings, dropout=model.dropout,
          embedding_shard_bytes=model.get('embedding_shard_bytes', 0))
    except ValueError as e:  # E.g. an odd head size with rotary positions.
      raise UserError(f'config keys model.width/heads/positions: {e}') from e

  def dataset(self, split, input_context, batch_size):
    return text.dataset(split, source=self.source,
                        seq_len=self.config.model.seq_len,
                        input_context=input_context, batch_size=batch_size,
                        seed=self.config.seed)

  def _token_loss(self, batch, outputs):
    """(loss [B, T], mask [B, T]): per-token loss, 1 for real tokens."""
    targets = batch[1]
    mask = tf.cast(targets != PAD, tf.float32)
    # float32 whatever the policy: the builder already returns float32
    # logits; the cast is a no-op then and a guard for other models.
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.maximum(targets, 0), logits=tf.cast(outputs, tf.float32))
    return loss * mask, mask

  def compute_loss(self, batch, outputs):
    loss, mask = self._token_loss(batch, outputs)
    tokens = tf.reduce_sum(mask, axis=-1)
    return tf.math.divide_no_nan(tf.reduce_sum(loss, axis=-1), tokens), tokens

  def compute_metrics(self, batch, outputs):
    _, mask = self._token_loss(batch, outputs)
    tokens = tf.reduce_sum(mask, axis=-1)
    predictions = tf.argmax(outputs, axis=-1, output_type=tf.int32)
    correct = tf.cast(tf.equal(predictions, batch[1]), tf.float32) * mask
    # Recomputed rather than passed from compute_loss; the graph optimizer
    # merges the identical ops, so it costs nothing.
    loss, _ = self.compute_loss(batch, outputs)
    return {'accuracy': (tf.math.divide_no_nan(tf.reduce_sum(correct, -1),
                                               tokens), tokens),
            'bits_per_byte': (loss / math.log(2.0), tokens)}

  def derived_metrics(self, metrics):
    # The loss is the mean over every real token of the split (weighted
    # per-sequence means): its exp is the corpus perplexity, not a mean of
    # per-batch perplexities.
    return {'perplexity': math.exp(min(metrics['loss'], 700.0))}

  def actions(self):
    return [actions_lib.Action(self.write_sample, after_eval=True,
                               name='text_sample')]

  def write_sample(self, context):
    """After each eval: a sample continued from held-out text (Text tab)."""
    stream = text.check_length(self.source, 'test', self.config.model.seq_len)
    prompt = stream[:SAMPLE_PROMPT].tolist()
    with self.ema_weights():
      sample = generate(self.model, prompt, SAMPLE_BYTES,
                        seq_len=self.config.model.seq_len, seed=context.step)
    context.writer.write_texts(context.step, {'sample': _as_markdown(
        bytes(prompt), bytes(sample))})

  def serving_input_signature(self):
    return [tf.TensorSpec([None, self.config.model.seq_len], tf.int32,
                          name='input_0')]


def generate(model, prompt: list[int], count: int, *, seq_len: int,
             seed: int = 0, temperature: float = 0.8) -> list[int]:
  """`count` bytes sampled after `prompt` (host, eagerly): each from the
  model's distribution at the last position of a window of the last
  seq_len bytes (causal: the zeros after it do not matter)."""
  rng = np.random.RandomState(seed)
  context, out = list(prompt), []
  for _ in range(count):
    window = context[-seq_len:]
    inputs = np.zeros([1, seq_len], np.int32)
    inputs[0, :len(window)] = window
    logits = np.asarray(model(inputs, training=False))[0, len(window) - 1]
    logits = logits.astype(np.float64) / temperature
    p = np.exp(logits - logits.max())
    byte = int(rng.choice(len(p), p=p / p.sum()))
    context.append(byte)
    out.append(byte)
  return out


def _as_markdown(prompt: bytes, sample: bytes) -> str:
  """Prompt and continuation as a markdown code block (4-space indent)."""
  text_ = (prompt + b'|' + sample).decode('utf-8', errors='replace')
  return '\n'.join('    ' + line for line in text_.splitlines())
