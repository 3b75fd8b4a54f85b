"""ResNet builders: sizes, a gradient step, learning, and synchronised BN."""

import numpy as np
import pytest
import tensorflow as tf

from models import resnet
from trainer.cluster import strategies


def _size(variables):
  return sum(int(np.prod(v.shape)) for v in variables)


def _cifar_trainable_params(n, num_classes, shortcut):
  """Counted by hand from the paper's table: conv kernels + BN gamma/beta."""
  total = 3 * 3 * 3 * 16 + 2 * 16                      # stem conv + BN
  f_in = 16
  for f in (16, 32, 64):
    total += 9 * f_in * f + 9 * f * f + 4 * f           # first block
    if shortcut == 'projection' and f_in != f:
      total += f_in * f + 2 * f                         # 1x1 conv + BN
    total += (n - 1) * (18 * f * f + 4 * f)             # other blocks
    f_in = f
  return total + 64 * num_classes + num_classes         # Dense


@pytest.mark.parametrize('depth,shortcut,approx', [
    (20, 'pad', 0.27e6), (56, 'pad', 0.85e6), (20, 'projection', 0.27e6)])
def test_cifar_resnet_parameter_count(depth, shortcut, approx):
  model = resnet.build_cifar_resnet(depth=depth, num_classes=10,
                                    shortcut=shortcut)
  trainable = _size(model.trainable_variables)
  assert trainable == _cifar_trainable_params((depth - 2) // 6, 10, shortcut)
  assert trainable == pytest.approx(approx, rel=0.02)
  assert model.output_shape == (None, 10)


def test_cifar_resnet_rejects_depth_not_6n_plus_2():
  with pytest.raises(ValueError, match='depth=21 is not 6n\\+2'):
    resnet.build_cifar_resnet(depth=21, num_classes=10)


def test_resnet50_parameter_count_and_forward_pass():
  model = resnet.build_resnet50(num_classes=1000)
  # torchvision's resnet50 has 25,557,032; BN moving stats are not counted.
  assert _size(model.trainable_variables) == 25_557_032
  assert _size(model.non_trainable_variables) == 53_120
  logits = model(tf.random.normal([1, 224, 224, 3]), training=False)
  assert logits.shape == (1, 1000) and logits.dtype == tf.float32
  assert np.all(np.isfinite(logits))


def test_logits_are_float32_under_mixed_precision():
  tf.keras.mixed_precision.set_global_policy('mixed_bfloat16')
  try:
    model = resnet.build_cifar_resnet(depth=8, num_classes=10, base_filters=4)
  finally:
    tf.keras.mixed_precision.set_global_policy('float32')
  assert model.get_layer('stem_conv').compute_dtype == 'bfloat16'
  logits = model(tf.random.normal([2, 32, 32, 3]), training=True)
  assert logits.shape == (2, 10) and logits.dtype == tf.float32


def test_gradient_step_changes_every_weight_and_loss_is_finite():
  model = resnet.build_cifar_resnet(depth=8, num_classes=10, base_filters=8)
  images = tf.random.normal([4, 32, 32, 3], seed=1)
  labels = tf.constant([0, 1, 2, 3])
  before = [v.numpy() for v in model.weights]
  with tf.GradientTape() as tape:
    loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(
        labels, model(images, training=True), from_logits=True))
  grads = tape.gradient(loss, model.trainable_variables)
  tf.keras.optimizers.SGD(0.1).apply_gradients(
      zip(grads, model.trainable_variables))
  assert np.isfinite(loss.numpy())
  # Trainable weights by the step, moving statistics by the training call.
  unchanged = [v.path for v, old in zip(model.weights, before)
               if np.array_equal(v.numpy(), old)]
  assert not unchanged


def test_resnet20_memorises_random_labels():
  tf.keras.utils.set_random_seed(0)
  rng = np.random.RandomState(0)
  images = rng.normal(size=(32, 32, 32, 3)).astype(np.float32)
  labels = rng.randint(0, 10, size=32).astype(np.int32)
  # Fast-moving averages so the inference-mode check below sees the
  # statistics of the final weights after only 20 steps.
  model = resnet.build_cifar_resnet(depth=20, num_classes=10, bn_momentum=0.5)
  optimizer = tf.keras.optimizers.Adam(3e-3)
  # Slots made here: variables created inside tf.function make it trace twice.
  optimizer.build(model.trainable_variables)

  @tf.function
  def train_step():
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(
          labels, model(images, training=True), from_logits=True))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss

  losses = [float(train_step()) for _ in range(20)]
  predictions = np.argmax(model(images, training=False), axis=-1)
  assert losses[-1] < 0.1 * losses[0]
  assert np.mean(predictions == labels) > 0.9


@pytest.mark.parametrize('sync', [True, False])
def test_batch_norm_statistics_over_two_replicas(sync):
  """sync: each replica's moving stats == one device on the whole batch.

  Without sync, Keras 3 lets the replicas' copies of the moving statistics
  drift apart (each keeps its own half's): the reason sync is the default.
  """
  images = tf.random.normal([8, 32, 32, 3], seed=2) * tf.range(
      1.0, 9.0)[:, None, None, None]      # halves with different statistics
  # momentum 0: moving statistics become exactly this batch's statistics.
  kwargs = dict(depth=8, num_classes=10, base_filters=4, bn_momentum=0.0)
  single = resnet.build_cifar_resnet(sync_batch_norm=False, **kwargs)
  devices = [d.name for d in tf.config.list_logical_devices('CPU')[:2]]
  strategy = strategies.mirrored_strategy(devices)
  with strategy.scope():
    mirrored = resnet.build_cifar_resnet(sync_batch_norm=sync, **kwargs)
  mirrored.set_weights(single.get_weights())
  single(images, training=True)
  halves = strategy.experimental_distribute_values_from_function(
      lambda ctx: images[4 * ctx.replica_id_in_sync_group:][:4])
  tf.function(lambda x: strategy.run(
      lambda x: mirrored(x, training=True), args=(x,)))(halves)

  norms = [l for l in single.layers
           if isinstance(l, tf.keras.layers.BatchNormalization)]
  assert len(norms) == 7                 # stem + 2 per block
  for norm in norms:
    other = mirrored.get_layer(norm.name)
    for stat in ('moving_mean', 'moving_variance'):
      expected = getattr(norm, stat).numpy()
      replicas = [v.numpy() for v in strategy.experimental_local_results(
          getattr(other, stat).value)]
      if sync:
        for value in replicas:
          np.testing.assert_allclose(value, expected, rtol=1e-4, atol=1e-5,
                                     err_msg=f'{norm.name}/{stat}')
      else:
        assert not np.allclose(replicas[0], replicas[1]), norm.name
