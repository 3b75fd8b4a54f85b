"""LM trainer: per-sequence loss, metrics, a step, learning, main.py runs."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from configs import lm_transformer
from models import lm
from tests import runner
from trainer.errors import UserError

PANGRAM = b'the quick brown fox jumps over the lazy dog. '


def _config(tmp_path, **model):
  """The smoke config on a tiny repetitive corpus under tmp_path."""
  for i in range(8):
    (tmp_path / f'doc{i}.txt').write_bytes(PANGRAM * (40 + i))
  config = lm_transformer.get_config('smoke')
  config.data.files = str(tmp_path / '*.txt')
  config.data.eval_percent = 50
  config.model.update(model)
  return config


def _trainer(config):
  return lm.LMTrainer(config=config, strategy=tf.distribute.get_strategy())


def _batch(trainer, batch_size=4):
  return next(iter(trainer.dataset('train', tf.distribute.InputContext(),
                                   batch_size)))


def test_loss_is_the_per_sequence_mean_token_cross_entropy(tmp_path):
  trainer = _trainer(_config(tmp_path))
  batch = _batch(trainer)
  outputs = trainer.forward(batch, training=False)
  loss, tokens = trainer.compute_loss(batch, outputs)
  metrics = trainer.compute_metrics(batch, outputs)
  assert loss.shape == (4,) and loss.dtype == tf.float32
  seq_len = trainer.config.model.seq_len
  np.testing.assert_array_equal(tokens, [seq_len] * 4)  # Nothing padded.
  logits = outputs.numpy().astype(np.float64)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  targets = batch[1].numpy()
  token_ce = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(loss, token_ce.mean(-1), rtol=1e-5)
  np.testing.assert_allclose(metrics['bits_per_byte'][0],
                             token_ce.mean(-1) / math.log(2), rtol=1e-5)
  accuracy = (logits.argmax(-1) == targets).mean(-1)
  np.testing.assert_allclose(metrics['accuracy'][0], accuracy, rtol=1e-6)
  assert set(metrics) == set(trainer.metric_names)


class PaddedLM(lm.LMTrainer):
  """Targets padded from a length that depends on each window's bytes, so
  replicas hold different numbers of real tokens, whatever the layout."""

  def dataset(self, split, input_context, batch_size):
    seq_len = self.config.model.seq_len

    def pad(inputs, targets):
      length = 1 + tf.reduce_sum(inputs, axis=-1) % seq_len  # [B]
      real = tf.range(seq_len)[None, :] < length[:, None]
      return inputs, tf.where(real, targets, lm.PAD)
    return super().dataset(split, input_context, batch_size).map(pad)


def test_padding_counts_for_nothing_on_1_2_and_4_replicas(tmp_path):
  """Per-token loss with uneven padding: the same weights on 1, 2 and 4
  replicas, and an eval loss that is the mean over real tokens only."""
  config = _config(tmp_path)
  config.train.global_batch_size = 8
  from trainer.cluster import strategies  # pylint: disable=import-outside-toplevel
  cpus = [d.name for d in tf.config.list_logical_devices('CPU')]
  results = {}
  for replicas in (1, 2, 4):
    tf.keras.utils.set_random_seed(0)
    strategy = (tf.distribute.OneDeviceStrategy(cpus[0]) if replicas == 1
                else strategies.mirrored_strategy(cpus[:replicas]))
    trainer = PaddedLM(config=config, strategy=strategy)
    if replicas > 1:
      trainer.model.set_weights(results[1][0])
    else:
      initial = trainer.model.get_weights()
    iterator = iter(trainer.distribute_dataset('train', batch_size=8))
    trainer.train(iterator, 4)
    results[replicas] = (initial if replicas == 1 else None, trainer)
  one = results[1][1]
  moved = [np.abs(a - b).max() for a, b in
           zip(initial, one.model.get_weights())]
  assert max(moved) > 1e-4
  for replicas in (2, 4):
    for a, b in zip(one.model.get_weights(),
                    results[replicas][1].model.get_weights()):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  # Eval: the mean cross-entropy over the real tokens of the held-out split.
  inputs, targets = [], []
  for x, y in one.dataset('test', tf.distribute.InputContext(), 64):
    inputs.append(x.numpy())
    targets.append(y.numpy())
  inputs, targets = np.concatenate(inputs), np.concatenate(targets)
  logits = one.model(inputs).numpy().astype(np.float64)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  real = targets != lm.PAD
  token_ce = -np.take_along_axis(log_p, np.maximum(targets, 0)[..., None],
                                 -1)[..., 0]
  assert 0.1 < real.mean() < 0.9  # Really padded.
  evaluation = results[4][1].evaluate('test')
  assert evaluation['loss'] == pytest.approx(token_ce[real].mean(), rel=1e-4)


def test_logits_and_loss_are_float32_under_mixed_precision(tmp_path):
  config = _config(tmp_path, tie_embeddings=False)
  config.train.precision = 'mixed_bfloat16'
  # The Trainer sets the policy from train.precision around build_model;
  # setting it here as well keeps the test meaningful on its own.
  tf.keras.mixed_precision.set_global_policy('mixed_bfloat16')
  try:
    trainer = _trainer(config)
  finally:
    tf.keras.mixed_precision.set_global_policy('float32')
  assert trainer.model.get_layer('block0').compute_dtype == 'bfloat16'
  batch = _batch(trainer)
  outputs = trainer.forward(batch, training=False)
  assert outputs.dtype == tf.float32
  assert trainer.compute_loss(batch, outputs)[0].dtype == tf.float32


def test_a_train_step_updates_weights_and_reports_metrics(tmp_path):
  trainer = _trainer(_config(tmp_path))
  before = [w.copy() for w in trainer.model.get_weights()]
  iterator = iter(trainer.distribute_dataset(
      'train', batch_size=trainer.global_batch_size))
  metrics = trainer.train(iterator, 2)
  assert metrics['steps'] == 2 and int(trainer.global_step.numpy()) == 2
  assert metrics['examples'] == 2 * trainer.global_batch_size
  assert np.isfinite(metrics['loss']) and 0 <= metrics['accuracy'] <= 1
  assert metrics['bits_per_byte'] == pytest.approx(
      metrics['loss'] / math.log(2), rel=1e-5)
  changed = [not np.array_equal(a, b)
             for a, b in zip(before, trainer.model.get_weights())]
  assert all(changed)
  spec, = trainer.serving_input_signature()
  assert spec.shape.as_list() == [None, trainer.config.model.seq_len]
  assert spec.dtype == tf.int32


def test_learns_a_repetitive_text(tmp_path):
  config = _config(tmp_path, width=64, heads=4)
  config.optimizer.learning_rate = 1e-2
  config.train.steps = 120
  tf.keras.utils.set_random_seed(0)
  trainer = _trainer(config)
  iterator = iter(trainer.distribute_dataset(
      'train', batch_size=trainer.global_batch_size))
  trainer.train(iterator, 100)
  last = trainer.train(iterator, 20)
  evaluation = trainer.evaluate('test')
  # A uniform guess costs log(256) = 5.5 nats; the pangram is predictable.
  assert last['loss'] < 0.5, last
  assert evaluation['loss'] < 0.5 and evaluation['accuracy'] > 0.85, evaluation


def test_smoke_run_through_main_then_quality_script(tmp_path):
  model_dir = str(tmp_path / 'run')
  result = runner.run_main('--config=configs/lm_transformer.py:smoke',
                           '--config.export.at_end=True',
                           f'--model_dir={model_dir}')
  assert result.returncode == 0, result.stderr[-3000:]
  final = runner.final_eval(result.stdout)
  assert final['bits_per_byte'] == pytest.approx(final['loss'] / math.log(2),
                                                 rel=1e-3)
  # The corpus perplexity: exp of the mean loss over every held-out token.
  assert final['perplexity'] == pytest.approx(math.exp(final['loss']),
                                              rel=1e-3)
  # After each eval (the final one: --mode=train), a sample in the Text tab.
  samples = runner.summary_values(os.path.join(model_dir, 'eval'))['sample']
  assert [step for step, _ in samples] == [6]
  text = tf.make_ndarray(samples[-1][1].tensor).item().decode()
  assert len(text.split('|', 1)[1]) > 0  # prompt|continuation
  assert 0 < final['accuracy'] <= 1 and final['examples'] > 0
  seq_len = lm_transformer.get_config('smoke').model.seq_len
  serve = tf.saved_model.load(os.path.join(model_dir, 'export')).signatures[
      'serving_default']
  logits = serve(input_0=tf.zeros([2, seq_len], tf.int32))['outputs']
  assert logits.shape == (2, seq_len, 256) and logits.dtype == tf.float32
  # A later line that a crash cut short: the script reads past it.
  with open(os.path.join(model_dir, 'eval', 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 12, "split": "te')
  quality = subprocess.run(
      [sys.executable, os.path.join(runner.REPO, 'bench', 'lm_quality.py'),
       f'--model_dir={model_dir}'], capture_output=True, text=True,
      timeout=120, check=False,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
  # Six steps learn next to nothing: exit 1, "not below the unigram".
  assert quality.returncode in (0, 1), quality.stderr[-3000:]
  assert 'unigram (add-one)' in quality.stdout
  assert 'LM at step 6' in quality.stdout
  assert 'note:' not in quality.stdout  # It scored the run's own windows.


def test_data_files_matching_nothing_stops_main_with_one_line(tmp_path):
  model_dir = tmp_path / 'run'
  result = runner.run_main('--config=configs/lm_transformer.py:smoke',
                           f'--config.data.files={tmp_path}/*.none',
                           f'--model_dir={model_dir}')
  assert result.returncode == 2, result.stderr[-3000:]
  errors = runner.error_lines(result.stderr)
  assert len(errors) == 1 and 'data.files=' in errors[0], errors
  assert not model_dir.exists()


@pytest.mark.parametrize('key, value, message', [
    ('model.heads', 3, 'model.heads=3 must divide model.width=32'),
    ('model.positions', 'sinusoid', "model.positions='sinusoid' is unknown"),
    ('model.seq_len', 0, 'model.seq_len=0 must be a positive integer'),
    ('model.embedding_shard_bytes', -1, r'model.embedding_shard_bytes=-1 '
     r'must be 0 \(the token table in one variable\) or at least one row of '
     r'it, 128 bytes \(4 x model.width\)'),
    ('model.embedding_shard_bytes', 64, 'model.embedding_shard_bytes=64 must '
     'be 0'),
    ('eval.split', 'validation', "eval.split='validation' cannot be "
     'evaluated'),
])
def test_bad_config_values_are_one_line_errors_naming_the_key(
    tmp_path, key, value, message):
  config = _config(tmp_path)
  section, name = key.split('.')
  config[section][name] = value
  with pytest.raises(UserError, match=message) as e:
    _trainer(config)
  assert '\n' not in str(e.value)
