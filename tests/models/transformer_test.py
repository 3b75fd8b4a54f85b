"""Transformer LM: shapes, causality, tying, gradients, learning, replicas."""

import numpy as np
import pytest
import tensorflow as tf

from models import transformer
from trainer.cluster import strategies

VOCAB, SEQ_LEN = 20, 16


def _lm(**overrides):
  kwargs = dict(vocab_size=VOCAB, seq_len=SEQ_LEN, width=32, depth=2,
                num_heads=2)
  return transformer.build_transformer_lm(**{**kwargs, **overrides})


def _tokens(batch=4, seed=0):
  return np.random.RandomState(seed).randint(
      0, VOCAB, size=(batch, SEQ_LEN)).astype(np.int32)


def _loss(model, tokens, targets, training=False):
  """Mean next-token cross-entropy (float32 scalar)."""
  return tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(
      targets, model(tokens, training=training), from_logits=True))


@pytest.mark.parametrize('positions', transformer.POSITIONS)
@pytest.mark.parametrize('tie', [True, False])
def test_logits_shape_and_dtype(positions, tie):
  logits = _lm(positions=positions, tie_embeddings=tie)(_tokens())
  assert logits.shape == (4, SEQ_LEN, VOCAB) and logits.dtype == tf.float32


@pytest.mark.parametrize('tie', [True, False])
def test_logits_are_float32_under_mixed_precision(tie):
  tf.keras.mixed_precision.set_global_policy('mixed_bfloat16')
  try:
    model = _lm(tie_embeddings=tie)
  finally:
    tf.keras.mixed_precision.set_global_policy('float32')
  logits = model(_tokens())
  assert logits.dtype == tf.float32 and np.all(np.isfinite(logits))


@pytest.mark.parametrize('positions', transformer.POSITIONS)
def test_changing_token_t_leaves_earlier_logits_unchanged(positions):
  model = _lm(positions=positions)
  tokens = _tokens(batch=1)
  t = 9
  changed = tokens.copy()
  changed[0, t] = (tokens[0, t] + 1) % VOCAB
  before, after = model(tokens).numpy(), model(changed).numpy()
  np.testing.assert_array_equal(before[0, :t], after[0, :t])
  # ... and does change every later position (attention reaches them).
  assert np.all(np.abs(before[0, t:] - after[0, t:]).max(axis=-1) > 1e-6)


def test_rotary_scores_depend_on_relative_position_only():
  rng = np.random.RandomState(1)
  # The same q and k vectors at every position: after RoPE their dot
  # products must depend on m - n alone, and norms must be preserved.
  q, k = (np.tile(rng.normal(size=(1, 1, 2, 8)), (1, 12, 1, 1)).astype(
      np.float32) for _ in range(2))
  rotated_q = transformer.apply_rotary(q)
  rotated_k = transformer.apply_rotary(k)
  scores = np.einsum('bqhd,bkhd->bhqk', rotated_q, rotated_k)[0]
  np.testing.assert_allclose(scores[:, 1:, 1:], scores[:, :-1, :-1],
                             rtol=1e-4, atol=1e-5)
  assert not np.allclose(scores[:, 0, 0], scores[:, 0, 1])
  np.testing.assert_allclose(np.linalg.norm(rotated_q, axis=-1),
                             np.linalg.norm(q, axis=-1), rtol=1e-5)


def test_tied_embeddings_share_one_matrix():
  tied, untied = _lm(tie_embeddings=True), _lm(tie_embeddings=False)
  def with_vocab_dim(model):
    return [v.path for v in model.trainable_variables if VOCAB in v.shape]
  assert with_vocab_dim(tied) == ['token_embedding/embeddings']
  assert sorted(with_vocab_dim(untied)) == [
      'logits/bias', 'logits/kernel', 'token_embedding/embeddings']
  # The logits are the final hidden states times that very matrix.
  hidden = tf.keras.Model(tied.input, tied.get_layer('final_norm').output)
  tokens = _tokens()
  embeddings = tied.get_layer('token_embedding').embeddings
  np.testing.assert_allclose(
      tied(tokens), np.einsum('btw,vw->btv', hidden(tokens), embeddings),
      rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('tie', [True, False], ids=['tied', 'untied'])
def test_a_sharded_token_table_is_the_same_function_and_gradient(tie):
  """embedding_shard_bytes holds the table as pieces of consecutive rows;
  with the same numbers the logits and the table's gradient are the same."""
  # 20 rows of 32 float32 (128 bytes); at most 1,000 bytes (7 rows) a
  # piece: 3 pieces.
  assert transformer.shard_rows(VOCAB, 32, 1000) == [7, 7, 6]
  whole = _lm(tie_embeddings=tie)
  sharded = _lm(tie_embeddings=tie, embedding_shard_bytes=1000)
  pieces = sharded.get_layer('token_embedding')
  assert [v.path for v in pieces.weights] == [
      f'token_embedding/embeddings_{i}' for i in range(3)]
  table = whole.get_layer('token_embedding').embeddings.numpy()
  for variable, rows in zip(pieces.weights, np.split(table, [7, 14])):
    variable.assign(rows)
  for layer in whole.layers:
    if layer.name != 'token_embedding':
      sharded.get_layer(layer.name).set_weights(layer.get_weights())
  tokens = _tokens()
  np.testing.assert_allclose(sharded(tokens), whole(tokens), rtol=1e-6,
                             atol=1e-6)

  def table_gradient(model):
    with tf.GradientTape() as tape:
      loss = _loss(model, tokens[:, :-1], tokens[:, 1:])
    layer = model.get_layer('token_embedding')
    grads = tape.gradient(loss, layer.weights)
    return np.concatenate([tf.convert_to_tensor(g) for g in grads])
  # The same sums in another order (per piece): float32 rounding apart.
  np.testing.assert_allclose(table_gradient(sharded), table_gradient(whole),
                             rtol=1e-5, atol=1e-7)
  # The layer's config keeps the pieces: a rebuilt model has them too.
  rebuilt = tf.keras.Model.from_config(sharded.get_config())
  assert [v.shape for v in rebuilt.get_layer('token_embedding').weights] == [
      (7, 32), (7, 32), (6, 32)]
  # Unsharded, the layer is what it was before the key existed: one
  # `embeddings` variable and no new config entry, so older checkpoints and
  # .keras files load.
  layer = whole.get_layer('token_embedding')
  assert [v.path for v in layer.weights] == ['token_embedding/embeddings']
  assert set(layer.get_config()) >= {'vocab_size', 'width'}
  assert 'shard_bytes' not in layer.get_config()


@pytest.mark.parametrize('vocab', [1, 7, 20, 256, 1000])
@pytest.mark.parametrize('max_bytes', [128, 300, 1000, 4096, 10 ** 6])
def test_token_table_pieces_are_at_most_the_size_and_as_few_as_can_be(
    vocab, max_bytes):
  rows = transformer.shard_rows(vocab, 32, max_bytes)  # 128 bytes a row.
  assert sum(rows) == vocab and min(rows) >= 1
  assert max(rows) * 128 <= max_bytes
  assert max(rows) - min(rows) <= 1 and rows == sorted(rows, reverse=True)
  fits = max_bytes // 128
  assert len(rows) == -(-vocab // fits)  # No fewer pieces would fit.
  with pytest.raises(ValueError, match='less than one row'):
    transformer.shard_rows(vocab, 32, 127)


@pytest.mark.parametrize('positions', transformer.POSITIONS)
def test_gradient_step_changes_every_weight_and_loss_is_finite(positions):
  model = _lm(positions=positions)
  tokens = _tokens()
  before = [v.numpy() for v in model.trainable_variables]
  with tf.GradientTape() as tape:
    loss = _loss(model, tokens[:, :-1], tokens[:, 1:], training=True)
  grads = tape.gradient(loss, model.trainable_variables)
  tf.keras.optimizers.SGD(0.1).apply_gradients(
      zip(grads, model.trainable_variables))
  assert np.isfinite(loss.numpy())
  unchanged = [v.path for v, old in zip(model.trainable_variables, before)
               if np.array_equal(v.numpy(), old)]
  assert not unchanged


def _repeating_batch(rng, batch=16):
  """Cycles of 1 2 1 3 1 4 1 5 from random offsets.

  The token after a 1 depends on the token two back, so a model that looks
  at the current token only is stuck at loss 0.5 * log(4) = 0.69; getting
  well below needs attention to the right earlier position.
  """
  pattern = np.array([1, 2, 1, 3, 1, 4, 1, 5], np.int32)
  offsets = rng.randint(0, len(pattern), size=(batch, 1))
  sequences = pattern[(offsets + np.arange(SEQ_LEN + 1)) % len(pattern)]
  return sequences[:, :-1], sequences[:, 1:]


@pytest.mark.parametrize('positions', transformer.POSITIONS)
def test_learns_a_repeating_sequence(positions):
  tf.keras.utils.set_random_seed(0)
  rng = np.random.RandomState(0)
  model = _lm(positions=positions)
  optimizer = tf.keras.optimizers.Adam(3e-3)
  optimizer.build(model.trainable_variables)  # else tf.function traces twice

  @tf.function
  def train_step(tokens, targets):
    with tf.GradientTape() as tape:
      loss = _loss(model, tokens, targets, training=True)
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss

  for _ in range(400):
    train_step(*_repeating_batch(rng))
  loss = float(_loss(model, *_repeating_batch(rng)))
  assert loss < 0.3, f'{loss} vs log(vocab) = {np.log(VOCAB):.2f}'


def test_gradients_over_two_replicas_match_one_device():
  tokens = _tokens(batch=8, seed=3)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  single = _lm(positions='rotary')
  devices = [d.name for d in tf.config.list_logical_devices('CPU')[:2]]
  strategy = strategies.mirrored_strategy(devices)
  with strategy.scope():
    mirrored = _lm(positions='rotary')
  mirrored.set_weights(single.get_weights())

  with tf.GradientTape() as tape:
    loss = _loss(single, inputs, targets)
  expected = tape.gradient(loss, single.trainable_variables)

  def replica_grads(x, y):
    with tf.GradientTape() as tape:
      # Mean over the replica's 4 examples / 2 replicas = global-batch mean.
      loss = _loss(mirrored, x, y) / strategy.num_replicas_in_sync
    grads = tape.gradient(loss, mirrored.trainable_variables)
    return tf.distribute.get_replica_context().all_reduce('sum', grads)

  halves = strategy.experimental_distribute_values_from_function(
      lambda ctx: (inputs[4 * ctx.replica_id_in_sync_group:][:4],
                   targets[4 * ctx.replica_id_in_sync_group:][:4]))
  grads = tf.function(lambda batch: strategy.run(replica_grads, args=batch))(
      halves)
  for variable, want, got in zip(single.trainable_variables, expected, grads):
    for replica_value in strategy.experimental_local_results(got):
      np.testing.assert_allclose(replica_value, want, rtol=1e-4, atol=1e-6,
                                 err_msg=variable.path)


@pytest.mark.parametrize('positions', transformer.POSITIONS)
def test_xla_and_saved_model_give_the_same_logits(positions, tmp_path):
  model = _lm(positions=positions, tie_embeddings=positions == 'rotary')
  tokens = _tokens()
  expected = model(tokens).numpy()
  jitted = tf.function(model, jit_compile=True)(tokens)
  np.testing.assert_allclose(jitted, expected, rtol=1e-5, atol=1e-5)
  model.save(tmp_path / 'lm.keras')
  loaded = tf.keras.models.load_model(tmp_path / 'lm.keras')
  np.testing.assert_allclose(loaded(tokens), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('overrides,message', [
    (dict(positions='alibi'), "positions='alibi' is unknown"),
    (dict(width=30, num_heads=4), 'width=30 must be a multiple of num_heads=4'),
    (dict(width=36, num_heads=4, positions='rotary'), 'odd head size 9'),
])
def test_bad_arguments_are_rejected(overrides, message):
  with pytest.raises(ValueError, match=message):
    _lm(**overrides)


def test_learned_positions_reject_sequences_longer_than_seq_len():
  with pytest.raises(tf.errors.InvalidArgumentError, match='seq_len=16'):
    _lm(positions='learned')(np.zeros((1, SEQ_LEN + 1), np.int32))
