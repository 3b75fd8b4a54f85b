"""The replica self-check: passes for a correct trainer, fails for a wrong one."""

import subprocess
import sys

import tensorflow as tf

from models.classifier import ClassifierTrainer
from tests import runner
from tests.trainer.trainer_test import make_config
from trainer.experiment import check_replicas


class PerReplicaMeanTrainer(ClassifierTrainer):
  """The classic mistake: the loss averaged over the replica's batch only."""

  def train_step(self, batch):
    with tf.GradientTape() as tape:
      outputs = self.forward(batch, training=True)
      per_example = self.compute_loss(batch, outputs)
      loss = tf.reduce_mean(per_example)
    grads = tape.gradient(loss, self.model.trainable_variables)
    self.apply_gradients(grads, self.model.trainable_variables)
    return {'loss': per_example, **self.compute_metrics(batch, outputs)}


def test_correct_trainer_passes():
  ok, report = check_replicas.compare(ClassifierTrainer, make_config('adam'),
                                      num_replicas=4, steps=10)
  assert ok, report


def test_per_replica_mean_loss_fails():
  ok, report = check_replicas.compare(PerReplicaMeanTrainer,
                                      make_config('sgd'), num_replicas=2,
                                      steps=10)
  assert not ok
  assert any('max rel diff' in line for line in report)


def test_per_replica_mean_loss_fails_under_adam_by_its_moments():
  """Adam's update cancels a gradient scaled by 2 almost exactly, so the
  weights of 1 and 2 replicas nearly agree; its moments do not."""
  ok, report = check_replicas.compare(PerReplicaMeanTrainer,
                                      make_config('adam'), num_replicas=2,
                                      steps=10)
  assert not ok, report
  assert any(line.startswith('  optimizer/') and 'momentum' in line
             for line in report), report


class UnsyncedNormTrainer(ClassifierTrainer):
  """Per-replica batch norm: in Keras 3 each replica's copy of the moving
  statistics keeps its own slice's, so the copies drift apart."""

  def build_model(self):
    return tf.keras.Sequential([
        tf.keras.Input((100,)), tf.keras.layers.Dense(16),
        tf.keras.layers.BatchNormalization(synchronized=False, name='norm'),
        tf.keras.layers.Dense(10)])


def test_replica_copies_that_drift_apart_fail():
  ok, report = check_replicas.compare(UnsyncedNormTrainer, make_config('sgd'),
                                      num_replicas=2, steps=4)
  assert not ok
  drifted = [line for line in report if 'replica copies differ' in line]
  assert any('norm/moving_mean' in line for line in drifted), report
  # The cause and the fix, once for the layer.
  explained = [line for line in drifted if 'synchronized=False' in line]
  assert len(explained) == 1 and 'synchronized=True' in explained[0], report


class BiasBeforeNormTrainer(ClassifierTrainer):
  """A Dense bias right before synchronized batch norm: the bias changes no
  output and, under Adam, follows rounding noise differently on 1 and N
  replicas."""

  def build_model(self):
    return tf.keras.Sequential([
        tf.keras.Input((100,)), tf.keras.layers.Dense(16, name='hidden'),
        tf.keras.layers.BatchNormalization(synchronized=True, name='norm'),
        tf.keras.layers.ReLU(), tf.keras.layers.Dense(10)])


class BiasBeforeNormPerReplicaMean(BiasBeforeNormTrainer,
                                   PerReplicaMeanTrainer):
  pass


def test_a_bias_before_batch_norm_is_noted_not_failed():
  ok, report = check_replicas.compare(BiasBeforeNormTrainer,
                                      make_config('adam'), num_replicas=2,
                                      steps=10)
  assert ok, report
  (note,) = [line for line in report if 'hidden/bias' in line]
  assert note.startswith('  note: ') and 'use_bias=False' in note, note
  # A real mistake in the same model still fails.
  ok, report = check_replicas.compare(BiasBeforeNormPerReplicaMean,
                                      make_config('adam'), num_replicas=2,
                                      steps=10)
  assert not ok
  assert any('hidden/kernel' in line and 'note' not in line
             for line in report), report


def test_an_optimizer_slot_belongs_to_the_weight_with_the_longest_name():
  weights = ['seq/dense/bias', 'seq/dense/bias_2', 'seq/einsum_dense/bias']
  owner = check_replicas.slot_owner
  assert owner('optimizer/adam/seq_dense_bias_momentum',
               weights) == 'seq/dense/bias'
  assert owner('optimizer/adam/seq_dense_bias_2_velocity',
               weights) == 'seq/dense/bias_2'
  assert owner('optimizer/adam/seq_einsum_dense_bias_momentum',
               weights) == 'seq/einsum_dense/bias'
  assert owner('seq/dense/bias', weights) is None  # A weight, not a slot.


def test_only_a_bias_that_batch_norm_cancels_is_excused():
  def model(*layers):
    return tf.keras.Sequential([tf.keras.Input((8,)), *layers])
  layers = tf.keras.layers
  excused = check_replicas.biases_before_norm(model(
      layers.Dense(4, name='h'), layers.BatchNormalization(name='n')))
  assert [path.split('/', 1)[1] for path in excused] == ['h/bias',
                                                         'n/moving_mean']
  frozen = layers.BatchNormalization()
  frozen.trainable = False  # Inference mode: the bias shifts the output.
  inputs = tf.keras.Input((8,))
  hidden = layers.Dense(8)(inputs)
  residual = tf.keras.Model(inputs, layers.Add()(
      [layers.BatchNormalization()(hidden), hidden]))
  for kept in (model(layers.Dense(4, activation='relu'),
                     layers.BatchNormalization()),
               model(layers.Dense(4), frozen), residual):
    assert not check_replicas.biases_before_norm(kept)


def test_command_reports_pass():
  result = subprocess.run(
      [sys.executable, '-m', 'trainer.experiment.check_replicas',
       '--config=configs/digits_mlp.py:smoke', '--num_replicas=2',
       '--steps=10'], capture_output=True, text=True, cwd=runner.REPO,
      timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith('PASS: ClassifierTrainer after 10 steps, '
                                  '1 vs 2 replicas')
