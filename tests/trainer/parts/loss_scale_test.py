"""Dynamic loss scaling (mixed_float16): the part alone, and the overflow
accounting through a Trainer."""

import numpy as np
import pytest
import tensorflow as tf

from tests.trainer.settings_test import build, make_config, run
from trainer.controller import Controller, ControllerOptions
from trainer.errors import UserError
from trainer.monitoring import summaries
from trainer.parts import loss_scale
from trainer.parts import status as status_lib
from trainer.persistence import checkpointing


def test_the_scale_halves_on_overflow_grows_after_good_steps_and_counts():
  scaling = loss_scale.DynamicLossScale()
  scaling.update(tf.constant(status_lib.OVERFLOW))
  assert float(scaling.scale.numpy()) == loss_scale.INITIAL_SCALE / 2
  assert int(scaling.skipped.numpy()) == 1
  for _ in range(loss_scale.GROWTH_STEPS - 1):
    scaling.update(tf.constant(status_lib.OK))
  assert float(scaling.scale.numpy()) == loss_scale.INITIAL_SCALE / 2
  scaling.update(tf.constant(status_lib.OK))  # The GROWTH_STEPS-th good one.
  assert float(scaling.scale.numpy()) == loss_scale.INITIAL_SCALE
  assert int(scaling.good_steps.numpy()) == 0
  grads = scaling.unscale([scaling.scale_loss(tf.constant(3.0))])
  assert float(grads[0]) == 3.0  # A power of two: exact.


@pytest.mark.parametrize('precision', ['mixed_float16', 'mixed_bfloat16'])
def test_mixed_precision_trains_close_to_float32(precision):
  reference = build(make_config())
  initial = reference.model.get_weights()
  run(reference)
  trainer = build(make_config(precision=precision))
  assert trainer.model.layers[1].compute_dtype == precision.split('_')[1]
  assert all(v.dtype == tf.float32 for v in trainer.model.trainable_weights)
  trainer.model.set_weights(initial)
  results = run(trainer)
  # The reported loss is the unscaled loss, close to float32's.
  assert results[0]['loss'] == pytest.approx(
      run(build(make_config()))[0]['loss'], rel=0.05)
  assert results[-1]['loss'] < results[0]['loss']
  # The global policy is left as it was for the next model.
  assert tf.keras.mixed_precision.global_policy().name == 'float32'
  if precision == 'mixed_float16':
    assert float(trainer.loss_scale.numpy()) == loss_scale.INITIAL_SCALE


@pytest.mark.parametrize('replicas', [1, 2])
def test_float16_overflow_halves_the_scale_and_skips_the_update(replicas):
  config = make_config(precision='mixed_float16')
  config.optimizer.warmup_steps = 100  # lr = 0.1 * updates / 100 for a while
  trainer = build(config, replicas)
  trainer.loss_scale.assign(2.0 ** 40)  # Gradients overflow float16.
  before = trainer.model.get_weights()
  iterator = iter(trainer.distribute_dataset(
      'train', batch_size=trainer.global_batch_size))
  result = trainer.train(iterator, 1)
  assert result['status'] == status_lib.OVERFLOW
  # Overflows are not errors: the loop goes on; each one halved the scale
  # and left the weights alone until the scale fits.
  assert float(trainer.loss_scale.numpy()) == 2.0 ** 39
  for a, b in zip(before, trainer.model.get_weights()):
    np.testing.assert_array_equal(a, b)
  # A skipped step is not a step, and reports no gradient norm (no NaN).
  assert result['steps'] == 0 and 'grad_norm' not in result
  assert int(trainer.global_step.numpy()) == 0
  result = trainer.train(iterator, 40)
  assert result['status'] == status_lib.OK
  overflows = 40 - int(np.log2(trainer.loss_scale.numpy()))
  assert overflows >= 3  # 2**40 is far above what float16 gradients allow.
  applied = 41 - overflows
  assert result['steps'] == applied  # The first loop applied none.
  assert np.isfinite(result['grad_norm']) and np.isfinite(result['loss'])
  # Step, optimizer iterations and schedule agree; the data stream counts
  # every batch taken, skipped or not.
  assert int(trainer.global_step.numpy()) == applied
  assert int(trainer.optimizer.iterations.numpy()) == applied
  assert trainer.learning_rate() == pytest.approx(0.1 * applied / 100)
  assert int(trainer.data_position.numpy()) == 41


def test_loops_that_apply_no_step_pass_no_boundary(tmp_path, monkeypatch):
  """While the scale comes down, whole inner loops overflow at step 0, a
  boundary of every cadence: none saves, evaluates or summarizes again."""
  trainer = build(make_config(precision='mixed_float16'), 1)
  trainer.loss_scale.assign(2.0 ** 40)
  checkpointer = checkpointing.Checkpointer(trainer, str(tmp_path),
                                            async_save=False)
  saves, evals = [], []
  save = checkpointer.save
  monkeypatch.setattr(checkpointer, 'save',
                      lambda: saves.append(int(trainer.global_step)) or save())
  written = []

  class Writer(summaries.NullWriter):

    def write_scalars(self, step, scalars):
      written.append(step)
  controller = Controller(
      trainer=trainer, checkpointer=checkpointer, total_steps=12,
      steps_per_loop=4, train_writer=Writer(), options=ControllerOptions(
          checkpoint_every=4, eval_every=4, summary_every=4))
  monkeypatch.setattr(controller, 'evaluate', lambda: evals.append(
      controller.step) or {'loss': 1.0, 'examples': 1})
  controller.train()
  idle = [step for step, loop in controller.history if not loop['steps']]
  assert idle[:3] == [0, 0, 0]  # Loops that applied nothing.
  assert saves == [4, 8, 12] and evals == [4, 8] and written == [4, 8, 12]


def test_a_step_that_bypasses_apply_gradients_is_refused_under_float16():
  class OwnUpdate(type(build(make_config(), 1))):

    def train_step(self, batch):
      grads, _, values = self.compute_gradients(batch)
      self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
      return values

  trainer = OwnUpdate(config=make_config(precision='mixed_float16'),
                      strategy=build(make_config(), 1).strategy)
  iterator = iter(trainer.distribute_dataset(
      'train', batch_size=trainer.global_batch_size))
  with pytest.raises(UserError, match=r"^OwnUpdate.train_step bypasses "
                     r"self.apply_gradients, which under train.precision="
                     r"'mixed_float16' skips the steps"):
    trainer.train(iterator, 1)


def test_the_count_of_good_steps_is_checkpointed(tmp_path, caplog):
  """The scale doubles after 2,000 good steps: a resumed run must go on
  counting from where the checkpoint was, or it doubles later than the
  uninterrupted run (other float16 rounding: not the same numbers)."""
  config = make_config(precision='mixed_float16')
  trainer = build(config, 1)
  trainer.loss_scaling.good_steps.assign(1234)
  trainer.loss_scale.assign(256.0)
  checkpointing.Checkpointer(trainer, str(tmp_path / 'new'),
                             async_save=False).save()
  resumed = build(config, 1)
  checkpointing.Checkpointer(resumed, str(tmp_path / 'new')).restore_latest()
  assert int(resumed.loss_scaling.good_steps.numpy()) == 1234
  assert float(resumed.loss_scale.numpy()) == 256.0
  # A checkpoint written without the count (an older version) restores the
  # rest, and says the count starts afresh.
  older = tf.train.Checkpoint(
      step=trainer.global_step, data_position=trainer.data_position,
      **{k: v for k, v in trainer.checkpoint_items().items()
         if k != 'loss_scale_good_steps'})
  older.write(str(tmp_path / 'old' / 'ckpt-0'))
  again = build(config, 1)
  checkpointing.Checkpointer(again, str(tmp_path / 'old')).restore_latest()
  assert float(again.loss_scale.numpy()) == 256.0
  assert int(again.loss_scaling.good_steps.numpy()) == 0
  assert 'holds no count of good steps of the loss scale' in caplog.text
