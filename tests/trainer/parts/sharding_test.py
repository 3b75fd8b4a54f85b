"""Weights in pieces over ps tasks (train.variable_shard_bytes): trained,
placed and checkpointed, checked against the same model held whole.

The pieces need a real ParameterServerStrategy: SCRIPT starts a worker and
two ps servers in one process (loopback) and prints what it measured. The
whole run through main.py is in tests/parameter_server_test.py.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests import runner
from trainer.cluster import parameter_server
from trainer.errors import UserError

SCRIPT = r"""
import json, tempfile
import numpy as np
import tensorflow as tf
from tests import runner
from trainer.cluster import parameter_server
from trainer.parts import sharding

sharded = tf.distribute.experimental.ParameterServerStrategy(
    runner.loopback_cluster(num_ps=2),
    variable_partitioner=parameter_server.RowPieces(2048))
coordinator = tf.distribute.coordinator.ClusterCoordinator(sharded)
whole = tf.distribute.get_strategy()
x = np.random.RandomState(0).randn(32, 64).astype('float32')
y = np.random.RandomState(1).randint(0, 10, 32)

def build(strategy, seed):
  tf.keras.utils.set_random_seed(seed)
  with strategy.scope():
    # The first kernel, 64 x 32 float32, is 8 KB: 4 pieces of 2 KB.
    model = tf.keras.Sequential([
        tf.keras.Input((64,)), tf.keras.layers.Dense(32, activation='relu'),
        tf.keras.layers.Dense(10)])
    sharding.adopt(model)
    variables = sharding.trainable_variables(model)
    optimizer = tf.keras.optimizers.Adam(0.01)
    optimizer.build(variables)
    # As the Trainer's Checkpointer does with its checkpoint items.
    sharding.save_pieces_once(model, {'model': model, 'optimizer': optimizer})
  return model, variables, optimizer

def trainer(strategy, model, variables, optimizer):
  @tf.function
  def step():
    def replica():
      with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(
            y, logits, from_logits=True))
      optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
      return loss
    return strategy.run(replica)
  def run(steps):
    losses = []
    for _ in range(steps):
      if strategy is sharded:
        losses.append(float(coordinator.schedule(step).fetch()))
      else:
        losses.append(float(step()))
    return losses
  return run

def weights(model):
  return [tf.convert_to_tensor(w).numpy().tolist() for w in model.weights]

out = {}
model, variables, optimizer = build(sharded, 0)
out['pieces'] = sharding.pieces(model)
out['piece_devices'] = [v.device for v in model.weights[0].value.variables]
out['piece_shapes'] = [v.shape.as_list() for v in model.weights[0].value.variables]
out['slot_devices'] = {v.path: v.value.device for v in optimizer.variables
                       if 'kernel_part' in v.path}
ref_model, ref_variables, ref_optimizer = build(whole, 0)
out['same_initial_weights'] = weights(model) == weights(ref_model)
out['sharded_losses'] = trainer(sharded, model, variables, optimizer)(5)
out['whole_losses'] = trainer(whole, ref_model, ref_variables, ref_optimizer)(5)
out['sharded_weights'] = weights(model)
out['whole_weights'] = weights(ref_model)

directory = tempfile.mkdtemp()
checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
saved = checkpoint.save(directory + '/sharded', options=tf.train.CheckpointOptions(
    experimental_enable_async_checkpoint=True))  # As the Trainer saves.
checkpoint.sync()
out['keys'] = {k: s for k, s in tf.train.list_variables(saved)}
# Into the model held whole (as --mode=eval with --strategy=default does).
other, _, _ = build(whole, 1)
tf.train.Checkpoint(model=other).read(saved).expect_partial(
    ).assert_existing_objects_matched()
out['restored_whole'] = weights(other)
# Into pieces, from a checkpoint of the model held whole.
ref_saved = tf.train.Checkpoint(model=ref_model).save(directory + '/whole')
pieces_model, _, _ = build(sharded, 1)
tf.train.Checkpoint(model=pieces_model).read(ref_saved).expect_partial(
    ).assert_existing_objects_matched()
out['restored_pieces'] = weights(pieces_model)
# A resume: model and slots restored into fresh pieces, then 3 more steps,
# as the run that saved continues.
resumed = build(sharded, 2)
tf.train.Checkpoint(model=resumed[0], optimizer=resumed[2]).read(
    saved).assert_existing_objects_matched()
out['resumed_losses'] = trainer(sharded, *resumed)(3)
out['continued_losses'] = trainer(sharded, model, variables, optimizer)(3)
out['resumed_weights'] = weights(resumed[0])
out['continued_weights'] = weights(model)

# A subclassed model builds itself on its first call, and Keras swallows an
# error raised there: the Trainer raises the partitioner's refusal itself.
class Subclassed(tf.keras.Model):
  def __init__(self):
    super().__init__()
    self.dense = tf.keras.layers.Dense(32)

  def call(self, inputs):
    return self.dense(inputs)

tiny = tf.distribute.experimental.ParameterServerStrategy(
    runner.loopback_cluster(num_ps=1),
    variable_partitioner=parameter_server.RowPieces(64))
with tiny.scope():
  Subclassed()(x)
try:
  sharding.check_built(tiny)
except Exception as e:
  out['refused'] = [type(e).__name__, str(e)]
print(json.dumps(out))
"""


@pytest.fixture(scope='module')
def measured():
  result = subprocess.run(
      [sys.executable, '-c', SCRIPT], cwd=runner.REPO, capture_output=True,
      text=True, timeout=240, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_large_weight_is_cut_into_pieces_over_both_ps_tasks(measured):
  assert measured['pieces'] == {'sequential/dense/kernel': [16, 16, 16, 16]}
  assert measured['piece_shapes'] == [[16, 32]] * 4  # 2 KB each.
  tasks = [d.split('/device:')[0] for d in measured['piece_devices']]
  assert all('/job:ps/' in t for t in tasks) and len(set(tasks)) == 2, tasks
  # Each piece's Adam slots sit on its own ps task.
  slots = measured['slot_devices']
  assert len(slots) == 8, slots
  for i, device in enumerate(measured['piece_devices']):
    for name in ('momentum', 'velocity'):
      (path,) = [p for p in slots if f'part_{i}_' in p and p.endswith(name)]
      assert slots[path] == device, (path, slots[path], device)


def test_pieces_train_as_the_whole_weight(measured):
  """5 Adam steps of the sharded model: the same losses and weights as the
  model held whole (one worker: the steps run in order)."""
  assert measured['same_initial_weights']
  assert len(measured['sharded_weights']) == 4
  np.testing.assert_allclose(measured['sharded_losses'],
                             measured['whole_losses'], rtol=1e-6)
  assert measured['sharded_losses'][-1] < measured['sharded_losses'][0] * 0.6
  for sharded, whole in zip(measured['sharded_weights'],
                            measured['whole_weights']):
    np.testing.assert_allclose(sharded, whole, rtol=1e-5, atol=1e-7)


def test_a_sharded_weight_is_saved_whole_and_once(measured):
  keys = measured['keys']
  kernel = 'model/_functional/_operations/1/_kernel/.ATTRIBUTES/VARIABLE_VALUE'
  assert keys[kernel] == [64, 32]
  # No piece saved again by the optimizer; its slots are per piece.
  assert not [k for k in keys if '_trainable_variables' in k], keys
  slots = [s for k, s in keys.items() if k.startswith('optimizer/_variables/')]
  assert slots.count([16, 32]) == 8, slots


def test_a_checkpoint_of_pieces_restores_whole(measured):
  """As --mode=eval and export with --strategy=default read it."""
  assert len(measured['restored_whole']) == 4
  assert measured['restored_whole'] == measured['sharded_weights']


def test_a_checkpoint_saved_whole_restores_into_pieces(measured):
  assert len(measured['restored_pieces']) == 4
  assert measured['restored_pieces'] == measured['whole_weights']


def test_a_resume_into_fresh_pieces_continues_the_run(measured):
  """The model and every piece's slots restored into a new model of the
  same pieces: 3 more steps give the losses and weights of the run that
  saved, continuing."""
  np.testing.assert_allclose(measured['resumed_losses'],
                             measured['continued_losses'], rtol=1e-6)
  assert len(measured['resumed_weights']) == 4
  for resumed, continued in zip(measured['resumed_weights'],
                                measured['continued_weights']):
    np.testing.assert_allclose(resumed, continued, rtol=1e-6, atol=1e-7)


def test_a_refusal_inside_a_subclassed_models_build_is_raised(measured):
  assert measured['refused'] == [
      'UserError', 'config key train.variable_shard_bytes=64 cuts a [64, 32] '
      'float32 variable below one row (128 bytes), and a piece holds whole '
      'rows; set it to at least 128, or 0 to keep variables whole']


def test_a_size_below_one_row_or_too_many_pieces_is_one_line():
  pieces = parameter_server.RowPieces(100)
  with pytest.raises(UserError) as e:
    pieces(tf.TensorShape([10, 64]), tf.float32)
  assert str(e.value) == (
      'config key train.variable_shard_bytes=100 cuts a [10, 64] float32 '
      'variable below one row (256 bytes), and a piece holds whole rows; set '
      'it to at least 256, or 0 to keep variables whole')
  assert pieces.refused is e.value
  with pytest.raises(UserError) as e:
    parameter_server.RowPieces(256)(tf.TensorShape([5000, 64]), tf.float32)
  assert str(e.value) == (
      'config key train.variable_shard_bytes=256 cuts a [5000, 64] float32 '
      'variable into 5000 pieces, more than 1024; set it to at least 1280 (5 '
      'rows), or 0 to keep variables whole')
  # Within both bounds: TensorFlow's MaxSizePartitioner.
  assert parameter_server.RowPieces(100)(tf.TensorShape([10, 25]),
                                         tf.float32) == [10, 1]
  assert parameter_server.RowPieces(1024)(tf.TensorShape([10, 64]),
                                          tf.float32) == [3, 1]
  assert parameter_server.RowPieces(4096)(tf.TensorShape([10, 64]),
                                          tf.float32) == [1, 1]
  assert parameter_server.RowPieces(1280)(tf.TensorShape([5000, 64]),
                                          tf.float32) == [1000, 1]
