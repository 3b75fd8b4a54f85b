"""AutoGraph converts a Trainer's own methods, never the framework's code."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.autograph.pyct import transpiler  # pylint: disable=g-direct-tensorflow-import

from models.classifier import ClassifierTrainer
from tests.trainer.trainer_test import make_config, strategy_for, train
from trainer import loops
from trainer.parts import autograph
from trainer.persistence import checkpointing


@pytest.fixture
def converted(monkeypatch):
  """The (module, qualified name) of every function AutoGraph converts."""
  names = []
  transform = transpiler.PyToPy.transform_function

  def recorded(self, fn, user_context):
    names.append((fn.__module__, fn.__qualname__))
    return transform(self, fn, user_context)
  monkeypatch.setattr(transpiler.PyToPy, 'transform_function', recorded)
  return names


def test_the_part_alone_converts_user_code_inside_framework_code():
  def user_code(x):
    if tf.reduce_sum(x) > 0:  # A tensor condition: needs AutoGraph.
      return x * 2.0
    return -x

  @autograph.framework
  def framework_code(x):
    return autograph.user(user_code)(x) + 1.0

  @autograph.framework
  def framework_code_calling_plainly(x):
    return user_code(x)

  assert float(tf.function(framework_code)(tf.constant(3.0))) == 7.0
  assert float(tf.function(framework_code)(tf.constant(-3.0))) == 4.0
  assert float(autograph.user(user_code)(tf.constant(-3.0))) == 3.0  # Eager.
  with pytest.raises(TypeError, match='Tensor` as a Python `bool` is not allowed'):
    tf.function(framework_code_calling_plainly)(tf.constant(3.0))


def test_user_code_is_converted_as_tf_function_converts_it():
  """The same options: the same graph as under a plain tf.function (with
  all of AutoGraph's optional features, every return gained an Identity)."""
  def user_code(x):
    values = []
    for i in range(3):
      values.append(x * float(i))
    return tf.add_n(values)

  def op_types(fn):
    graph = tf.function(fn).get_concrete_function(
        tf.TensorSpec([], tf.float32)).graph
    return sorted(op.type for op in graph.get_operations())
  from_framework = autograph.framework(
      lambda x: autograph.user(user_code)(x))
  assert op_types(from_framework) == op_types(user_code)


class BranchingTrainer(ClassifierTrainer):
  """Python control flow on tensors in the methods a user writes."""

  def forward(self, batch, training):
    inputs, _ = batch
    if tf.reduce_max(inputs) > 1e6:  # Never true: only for AutoGraph.
      inputs = inputs * 0.0
    return self.model(inputs, training=training)

  def compute_loss(self, batch, outputs):
    loss = super().compute_loss(batch, outputs)
    for _ in tf.range(2):  # A tensor loop: a tf.while_loop once converted.
      loss = tf.identity(loss)
    return loss

  def train_step(self, batch):
    grads, loss, values = self.compute_gradients(batch)
    self.apply_gradients(grads, self.model.trainable_variables, loss=loss)
    if loss < 0.0:  # Never true: only for AutoGraph.
      values = dict(values, loss=values['loss'] * 0.0)
    return values


@pytest.mark.parametrize('replicas', [1, 2])
def test_a_trainers_own_control_flow_is_converted_and_trains_the_same(
    replicas, converted):
  config = make_config('adam')
  reference, _ = train(config, replicas)
  trainer, metrics = train(config, replicas, trainer_cls=BranchingTrainer)
  assert int(trainer.global_step.numpy()) == int(
      reference.global_step.numpy()) > 0
  for a, b in zip(reference.model.get_weights(), trainer.model.get_weights()):
    np.testing.assert_array_equal(a, b)
  assert metrics[-1]['steps'] == 8
  evaluated = trainer.evaluate('test')
  assert evaluated == reference.evaluate('test')
  mine = {name for module, name in converted if module == __name__}
  assert {'BranchingTrainer.forward', 'BranchingTrainer.compute_loss',
          'BranchingTrainer.train_step'} <= mine


class BranchingForward(BranchingTrainer):
  """The built-in train_step (its own train_step is refused with
  gradient accumulation)."""
  train_step = ClassifierTrainer.train_step


@pytest.mark.parametrize('key, value', [('jit_compile', True),
                                        ('grad_accum_steps', 2)])
def test_user_control_flow_under_xla_and_accumulation(key, value):
  """The Trainer's methods run inside an XLA-compiled function, or in the
  body of the micro-batch while loop."""
  config = make_config('adam')
  config.train[key] = value
  reference, _ = train(config, 1, loops=(4,))
  trainer, _ = train(config, 1, trainer_cls=BranchingForward, loops=(4,))
  assert int(trainer.global_step.numpy()) == 4
  for a, b in zip(reference.model.get_weights(), trainer.model.get_weights()):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


def test_only_trainer_methods_and_the_eval_loop_are_converted(converted,
                                                              tmp_path):
  """The framework builds its graph with explicit control flow; converting
  it cost ~3 s of start-up (parts/autograph.py)."""
  trainer = ClassifierTrainer(config=make_config(), strategy=strategy_for(2))
  iterator = iter(trainer.distribute_dataset(
      'train', batch_size=trainer.global_batch_size))
  loops.trace_train(trainer, iterator)
  trainer.train(iterator, 2, measure_input_wait=True)  # The timed loop.
  loops.trace_eval(trainer, trainer.distribute_dataset(
      'test', batch_size=trainer.eval_global_batch_size))
  checkpointer = checkpointing.Checkpointer(trainer, str(tmp_path))
  checkpointer.save()  # Its snapshot and write are traced functions too.
  checkpointer.wait()
  assert tf.train.latest_checkpoint(str(tmp_path))
  framework = {f'{module}.{name}' for module, name in converted
               if module.startswith('trainer.')}
  assert converted and framework <= {
      'trainer.trainer.Trainer.forward', 'trainer.trainer.Trainer.train_step',
      'trainer.trainer.Trainer.eval_step',
      'trainer.trainer.Trainer.eval_outputs', 'trainer.loops.eval_loop'}
