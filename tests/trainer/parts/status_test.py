"""The step status every replica agrees on."""

import tensorflow as tf

from trainer.parts import status


def test_agreed_status_from_all_reduced_values():
  def agreed(finite, stop, loss_finite=None):
    return int(status.agreed(finite=tf.constant(finite),
                             stop=tf.constant(stop),
                             loss_finite=None if loss_finite is None else
                             tf.constant(loss_finite)))
  assert agreed(True, 0.0) == status.OK
  assert agreed(True, 1.0) == status.STOP_REQUESTED
  assert agreed(False, 1.0) == status.NONFINITE
  # Under loss scaling, a finite loss with non-finite gradients overflowed.
  assert agreed(False, 0.0, loss_finite=True) == status.OVERFLOW
  assert agreed(False, 0.0, loss_finite=False) == status.NONFINITE


def test_which_statuses_go_on_and_which_were_applied():
  values = [status.OK, status.STOP_REQUESTED, status.NONFINITE, status.OVERFLOW]
  goes_on = [bool(status.continues(tf.constant(v))) for v in values]
  applied = [bool(status.applied(tf.constant(v))) for v in values]
  assert goes_on == [True, False, False, True]
  assert applied == [True, True, False, False]


def test_a_replicas_own_view():
  assert int(status.local(tf.constant([1.0, 2.0]), tf.constant(0.0))) == (
      status.OK)
  assert int(status.local(tf.constant([1.0, float('nan')]),
                          tf.constant(0.0))) == status.NONFINITE
  assert int(status.local(tf.constant([1.0]), tf.constant(1.0))) == (
      status.STOP_REQUESTED)


def test_without_loss_scaling_only_ok_goes_on():
  values = [status.OK, status.STOP_REQUESTED, status.NONFINITE]
  goes_on = [bool(status.continues(tf.constant(v), overflow=False))
             for v in values]
  assert goes_on == [True, False, False]


def test_a_step_of_its_own_is_not_advised_a_clip_it_cannot_have():
  """A train_step that bypasses apply_gradients: its update was applied and
  train.clip_norm would be refused for it (only apply_gradients clips)."""
  message = status.nonfinite_message(
      5, None, nan_retries=0, used_up=False, guarded=False, clip_norm=0.0)
  assert message == (
      'non-finite loss or weights at step 5; no checkpoint was written after '
      'it (train.nan_retries=0); look for NaN or Inf in the inputs of that '
      'batch, or lower the learning rate (or set train.nan_retries)')
  guarded = status.nonfinite_message(
      5, 1.5, nan_retries=2, used_up=True, guarded=True, clip_norm=0.0)
  assert guarded == (
      'non-finite gradient norm (the loss was finite) at step 5 after 2 '
      'retries; the update was not applied and no checkpoint was written '
      'after it (train.nan_retries=2); look for NaN or Inf in the inputs of '
      'that batch, or lower the learning rate or enable train.clip_norm')
