"""A decoder-only Transformer language model (GPT-2 style, pre-LayerNorm).

tokens int32 [B, T] -> token embedding (+ learned positions) -> depth x
[x + attn(LN(x)); x + mlp(LN(x))] -> LN -> logits float32 [B, T, vocab].
Attention is causal; with `positions='rotary'` (RoPE, Su et al. 2021) q and k
are rotated by position inside attention and there is no position table.
With `tie_embeddings` the logits are hidden @ E^T with the token embedding E:
one [vocab, width] table serves both ends. With `embedding_shard_bytes` the
table is held as several variables of consecutive rows, which
--strategy=parameter_server places round-robin over the ps tasks.

Every layer here is registered Keras-serializable (package 'distloop'), so the
model round-trips through get_config / `.keras` files, and uses only TF ops
that run under tf.function, XLA and tf.distribute replica contexts.
"""

import math

import tensorflow as tf

layers = tf.keras.layers
POSITIONS = ('learned', 'rotary')
# GPT-2's initialisation: N(0, 0.02) everywhere, residual output projections
# scaled by 1/sqrt(2 * depth) so the residual stream's variance does not grow
# with depth.
_INIT_STDDEV = 0.02
_LN_EPSILON = 1e-5


def _normal(stddev=_INIT_STDDEV):
  return tf.keras.initializers.RandomNormal(stddev=stddev)


def shard_rows(vocab_size: int, width: int, max_bytes: int) -> list[int]:
  """Rows of each piece of a float32 [vocab_size, width] table cut into the
  fewest pieces of at most `max_bytes` each (0: one piece), as even as can
  be, the first ones a row longer (tf.nn.embedding_lookup's 'div' split).

  Raises:
    ValueError: `max_bytes` is smaller than one row (4 * width bytes).
  """
  if not max_bytes:
    return [vocab_size]
  rows = max_bytes // (4 * width)
  if rows < 1:
    raise ValueError(f'{max_bytes} bytes is less than one row of the table '
                     f'({4 * width} bytes)')
  pieces = -(-vocab_size // rows)
  return [vocab_size // pieces + (i < vocab_size % pieces)
          for i in range(pieces)]


@tf.keras.utils.register_keras_serializable(package='distloop')
class TokenEmbedding(layers.Layer):
  """Token lookup, and its transpose as the output layer (weight tying).

  `layer(tokens)` gives [B, T, width] in the compute dtype;
  `layer(hidden, reverse=True)` gives float32 logits hidden @ E^T.

  With `shard_bytes` > 0 the table E is held as variables
  `embeddings_0, embeddings_1, ...` of consecutive rows, each at most that
  many bytes (shard_rows): the same function as one table, whose pieces a
  parameter-server cluster places round-robin over its ps tasks. A lookup
  reads only the rows it needs from each piece; the transpose (tied
  logits) reads every piece. Without it: one variable `embeddings`.
  """

  def __init__(self, vocab_size, width, shard_bytes=0, **kwargs):
    super().__init__(**kwargs)
    self.vocab_size = vocab_size
    self.width = width
    self.shard_bytes = shard_bytes

  def build(self, input_shape):
    rows = shard_rows(self.vocab_size, self.width, self.shard_bytes)
    if len(rows) == 1:
      self.embeddings = self.add_weight(
          shape=(self.vocab_size, self.width), initializer=_normal(),
          name='embeddings')
      return
    for i, n in enumerate(rows):
      setattr(self, f'embeddings_{i}', self.add_weight(
          shape=(n, self.width), initializer=_normal(),
          name=f'embeddings_{i}'))
    self.num_shards = len(rows)

  def pieces(self) -> list:
    """The table's variables, in row order (one when not sharded)."""
    if not hasattr(self, 'num_shards'):
      return [self.embeddings]
    return [getattr(self, f'embeddings_{i}') for i in range(self.num_shards)]

  def call(self, inputs, reverse=False):
    pieces = [tf.cast(p, self.compute_dtype) for p in self.pieces()]
    if reverse:
      # The logits of each piece's rows, side by side: [B, T, vocab_size].
      return tf.cast(tf.concat(
          [tf.matmul(inputs, p, transpose_b=True) for p in pieces], axis=-1),
                     tf.float32)
    if len(pieces) == 1:
      return tf.gather(pieces[0], inputs)
    # Each id's row from the piece holding it ('div': consecutive rows).
    return tf.nn.embedding_lookup(pieces, inputs)

  def get_config(self):
    config = {**super().get_config(), 'vocab_size': self.vocab_size,
              'width': self.width}
    if self.shard_bytes:
      config['shard_bytes'] = self.shard_bytes
    return config


@tf.keras.utils.register_keras_serializable(package='distloop')
class AddPositionEmbedding(layers.Layer):
  """x + P[:T] with a learned table P [max_length, width]."""

  def __init__(self, max_length, **kwargs):
    super().__init__(**kwargs)
    self.max_length = max_length

  def build(self, input_shape):
    self.positions = self.add_weight(
        shape=(self.max_length, input_shape[-1]), initializer=_normal(0.01),
        name='positions')

  def call(self, inputs):
    length = tf.shape(inputs)[1]
    tf.debugging.assert_less_equal(
        length, self.max_length,
        message=f'sequence longer than seq_len={self.max_length}, the size '
        'of the learned position table; build the model with a larger seq_len')
    return inputs + tf.cast(self.positions[:length], inputs.dtype)

  def get_config(self):
    return {**super().get_config(), 'max_length': self.max_length}


def apply_rotary(x, base=10000.0):
  """Rotates pairs of features of q or k by position-dependent angles (RoPE).

  Feature i of the first half is paired with feature i of the second half (the
  GPT-NeoX / LLaMA layout) and rotated by angle pos * base^(-2i / D), so the
  dot product of a rotated q at position m and k at n depends on m - n only.

  Args:
    x: [B, T, heads, D] queries or keys, D even.
    base: wavelength base of the angles.

  Returns:
    x rotated, same shape and dtype.
  """
  head_dim = x.shape[-1]
  inv_freq = base**(-tf.range(0, head_dim, 2, dtype=tf.float32) / head_dim)
  angles = tf.einsum('t,f->tf', tf.cast(tf.range(tf.shape(x)[1]), tf.float32),
                     inv_freq)[:, None, :]             # [T, 1, D/2]
  # Angles in float32: positions * frequencies lose precision in float16.
  cos, sin = tf.cast(tf.cos(angles), x.dtype), tf.cast(tf.sin(angles), x.dtype)
  x1, x2 = tf.split(x, 2, axis=-1)
  return tf.concat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


@tf.keras.utils.register_keras_serializable(package='distloop')
class CausalSelfAttention(layers.Layer):
  """Multi-head causal self-attention; position i attends to positions <= i."""

  def __init__(self, width, num_heads, rotary=False, dropout=0.0,
               output_stddev=_INIT_STDDEV, **kwargs):
    super().__init__(**kwargs)
    if width % num_heads:
      raise ValueError(f'width={width} must be a multiple of '
                       f'num_heads={num_heads}')
    if rotary and (width // num_heads) % 2:
      raise ValueError(
          f'width={width} / num_heads={num_heads} gives an odd head size '
          f"{width // num_heads}; positions='rotary' rotates pairs of "
          'features, so choose an even head size')
    self.width, self.num_heads = width, num_heads
    self.rotary, self.dropout = rotary, dropout
    self.output_stddev = output_stddev
    self.qkv = layers.Dense(3 * width, kernel_initializer=_normal(),
                            name='qkv')
    self.out = layers.Dense(width, kernel_initializer=_normal(output_stddev),
                            name='out')
    self.attention_dropout = layers.Dropout(dropout)

  def build(self, input_shape):
    self.qkv.build(input_shape)
    self.out.build((*input_shape[:-1], self.width))

  def call(self, inputs, training=None):
    batch, length = tf.shape(inputs)[0], tf.shape(inputs)[1]
    head_dim = self.width // self.num_heads
    qkv = tf.reshape(self.qkv(inputs),
                     [batch, length, 3, self.num_heads, head_dim])
    q, k, v = tf.unstack(qkv, axis=2)                 # each [B, T, H, D]
    if self.rotary:
      q, k = apply_rotary(q), apply_rotary(k)
    scores = tf.einsum('bqhd,bkhd->bhqk', q, k) * (1.0 / math.sqrt(head_dim))
    # Softmax in float32: float16 scores overflow and lose the small weights.
    scores = tf.cast(scores, tf.float32)
    positions = tf.range(length)
    causal = positions[:, None] >= positions[None, :]  # [T_query, T_key]
    scores = tf.where(causal, scores, tf.float32.min)
    weights = tf.cast(tf.nn.softmax(scores, axis=-1), v.dtype)
    weights = self.attention_dropout(weights, training=training)
    context = tf.einsum('bhqk,bkhd->bqhd', weights, v)
    return self.out(tf.reshape(context, [batch, length, self.width]))

  def get_config(self):
    return {**super().get_config(), 'width': self.width,
            'num_heads': self.num_heads, 'rotary': self.rotary,
            'dropout': self.dropout, 'output_stddev': self.output_stddev}


@tf.keras.utils.register_keras_serializable(package='distloop')
class TransformerBlock(layers.Layer):
  """Pre-LN block: x + attn(LN(x)), then x + mlp(LN(x)) with a GELU MLP."""

  def __init__(self, width, num_heads, mlp_ratio=4, rotary=False, dropout=0.0,
               output_stddev=_INIT_STDDEV, **kwargs):
    super().__init__(**kwargs)
    self.width, self.num_heads, self.mlp_ratio = width, num_heads, mlp_ratio
    self.rotary, self.dropout = rotary, dropout
    self.output_stddev = output_stddev
    self.attention_norm = layers.LayerNormalization(epsilon=_LN_EPSILON,
                                                    name='attention_norm')
    self.attention = CausalSelfAttention(
        width, num_heads, rotary=rotary, dropout=dropout,
        output_stddev=output_stddev, name='attention')
    self.mlp_norm = layers.LayerNormalization(epsilon=_LN_EPSILON,
                                              name='mlp_norm')
    self.mlp_in = layers.Dense(mlp_ratio * width, activation='gelu',
                               kernel_initializer=_normal(), name='mlp_in')
    self.mlp_out = layers.Dense(width,
                                kernel_initializer=_normal(output_stddev),
                                name='mlp_out')
    self.residual_dropout = layers.Dropout(dropout)

  def build(self, input_shape):
    for layer in (self.attention_norm, self.attention, self.mlp_norm,
                  self.mlp_in):
      layer.build(input_shape)
    self.mlp_out.build((*input_shape[:-1], self.mlp_ratio * self.width))

  def call(self, inputs, training=None):
    x = inputs + self.residual_dropout(
        self.attention(self.attention_norm(inputs), training=training),
        training=training)
    mlp = self.mlp_out(self.mlp_in(self.mlp_norm(x)))
    return x + self.residual_dropout(mlp, training=training)

  def get_config(self):
    return {**super().get_config(), 'width': self.width,
            'num_heads': self.num_heads, 'mlp_ratio': self.mlp_ratio,
            'rotary': self.rotary, 'dropout': self.dropout,
            'output_stddev': self.output_stddev}


def build_transformer_lm(*, vocab_size: int, seq_len: int, width: int,
                         depth: int, num_heads: int, mlp_ratio: int = 4,
                         positions: str = 'learned',
                         tie_embeddings: bool = True, dropout: float = 0.0,
                         embedding_shard_bytes: int = 0,
                         name: str = 'transformer_lm') -> tf.keras.Model:
  """Returns a decoder-only LM: int32 tokens [B, T] -> float32 logits [B, T, V].

  logits[:, t] predicts token t + 1 from tokens 0..t; the loss is the caller's
  (typically sparse softmax cross-entropy against the tokens shifted by one).

  Args:
    vocab_size: number of token ids (V).
    seq_len: longest sequence; the size of the learned position table. T may
      be shorter at call time.
    width: model (residual stream) width.
    depth: number of Transformer blocks.
    num_heads: attention heads; must divide width (into an even head size
      with rotary positions).
    mlp_ratio: hidden width of the MLP as a multiple of width.
    positions: 'learned' (a table added to the token embeddings) or 'rotary'
      (RoPE on q and k in every attention layer; no parameters).
    tie_embeddings: logits = final hidden @ token_embedding^T (one shared
      matrix); otherwise a separate Dense output layer.
    dropout: rate after the embeddings, on attention weights and on each
      residual branch (active only with training=True).
    embedding_shard_bytes: > 0: the token table is held in pieces of at most
      this many bytes (TokenEmbedding); 0: one variable.
    name: model name.

  Returns:
    A functional tf.keras.Model built from the layers of this module.

  Raises:
    ValueError: unknown `positions`, or width not divisible as required.
  """
  if positions not in POSITIONS:
    raise ValueError(f'positions={positions!r} is unknown; use one of '
                     f'{", ".join(POSITIONS)}')
  tokens = tf.keras.Input(shape=(None,), dtype='int32', name='tokens')
  embedding = TokenEmbedding(vocab_size, width,
                             shard_bytes=embedding_shard_bytes,
                             name='token_embedding')
  x = embedding(tokens)
  if positions == 'learned':
    x = AddPositionEmbedding(seq_len, name='position_embedding')(x)
  x = layers.Dropout(dropout, name='embedding_dropout')(x)
  for i in range(depth):
    x = TransformerBlock(width, num_heads, mlp_ratio=mlp_ratio,
                         rotary=positions == 'rotary', dropout=dropout,
                         output_stddev=_INIT_STDDEV / math.sqrt(2 * depth),
                         name=f'block{i}')(x)
  x = layers.LayerNormalization(epsilon=_LN_EPSILON, name='final_norm')(x)
  if tie_embeddings:
    logits = embedding(x, reverse=True)
  else:
    # float32 even under a mixed-precision policy: the loss wants float32.
    logits = layers.Dense(vocab_size, kernel_initializer=_normal(),
                          dtype='float32', name='logits')(x)
  return tf.keras.Model(tokens, logits, name=name)
