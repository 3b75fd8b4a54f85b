"""Metrics that are not per-example means: streaming Keras metrics (AUC, F1)
and metrics aggregated on the host from every prediction, exact on any
replica count (examples/extras.py is the Trainer)."""

import numpy as np
import pytest
import tensorflow as tf

from examples.extras import ExtrasTrainer
from input import digits
from trainer.cluster import strategies
from trainer.experiment import config_file
from trainer.persistence import export

CPUS = [d.name for d in tf.config.list_logical_devices('CPU')]


def config():
  result = config_file.load_module(
      'examples/extras_config.py').get_config('smoke')
  result.eval.global_batch_size = 96  # 360 = 3 x 96 + 72: a partial batch.
  result.train.global_batch_size = 48  # Divides by 1, 2, 3 and 4.
  return result


def roc_auc(positive, scores):
  """The area under the ROC curve, by its definition: the chance that a
  random positive scores above a random negative, a tie counting half."""
  pos, neg = scores[positive][:, None], scores[~positive][None, :]
  wins = np.sum(pos > neg) + 0.5 * np.sum(pos == neg)
  return wins / (pos.size * neg.size)


def macro_f1(labels, predicted):
  """The mean over classes (those of labels or predictions) of each class's
  2 TP / (2 TP + FP + FN)."""
  scores = []
  for c in np.union1d(labels, predicted):
    true_positives = np.sum((predicted == c) & (labels == c))
    wrong = np.sum(predicted != labels, where=(predicted == c) | (labels == c))
    scores.append(2 * true_positives / (2 * true_positives + wrong))
  return float(np.mean(scores))


def host_metrics(export_dir):
  """AUC, macro F1, median loss of the exported model's predictions, in
  numpy on the host."""
  serve = tf.saved_model.load(export_dir).signatures['serving_default']
  features, labels = digits.load('test')
  logits = serve(input_0=tf.constant(features))['outputs'].numpy()
  probabilities = tf.nn.softmax(logits).numpy()
  loss = tf.keras.losses.sparse_categorical_crossentropy(
      labels, logits, from_logits=True).numpy()
  return {'auc': roc_auc(labels == 8, probabilities[:, 8]),
          'f1': macro_f1(labels, logits.argmax(-1)),
          'median_loss': float(np.median(loss)), 'eval_examples': len(labels)}


@pytest.fixture(name='trained', scope='module')
def fixture_trained(tmp_path_factory):
  """(weights, host metrics) of an ExtrasTrainer trained 40 steps."""
  tf.keras.utils.set_random_seed(0)
  trainer = ExtrasTrainer(config=config(), strategy=tf.distribute.get_strategy())
  iterator = iter(trainer.distribute_dataset('train', batch_size=48))
  trainer.train(iterator, 40)
  path = export.export_saved_model(
      trainer, str(tmp_path_factory.mktemp('extras') / 'export'))
  return trainer.model.get_weights(), host_metrics(path)


@pytest.mark.parametrize('replicas', [1, 2, 3, 4])
def test_streaming_and_aggregated_metrics_equal_the_host_computation(
    trained, replicas):
  weights, expected = trained
  strategy = (tf.distribute.OneDeviceStrategy(CPUS[0]) if replicas == 1 else
              strategies.mirrored_strategy(CPUS[:replicas]))
  trainer = ExtrasTrainer(config=config(), strategy=strategy)
  trainer.model.set_weights(weights)
  assert 0.6 < expected['auc'] < 1 and 0.1 < expected['f1'] < 1  # Learning.
  for _ in range(2):  # State is reset between evaluations.
    got = trainer.evaluate('test')
    assert got['eval_examples'] == 360  # Each example exactly once.
    assert got['median_loss'] == pytest.approx(expected['median_loss'],
                                               rel=1e-5)
    assert got['f1'] == pytest.approx(expected['f1'], rel=1e-5)
    assert got['auc'] == pytest.approx(expected['auc'], abs=2e-3)
