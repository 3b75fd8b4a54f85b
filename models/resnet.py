"""ResNets: CIFAR-style (ResNet-20/32/44/56/110) and ImageNet ResNet-50 v1.5.

Both take float NHWC images and return float32 logits [B, num_classes]; no
L2 regularisers (weight decay belongs to the optimizer, decoupled).

Batch norm. With `sync_batch_norm=True` every BatchNormalization layer is
`synchronized=True`: in a tf.distribute replica context Keras 3 (TF backend)
all-reduces the per-replica sum, sum of squares and count, so batch statistics
and moving averages are those of the global batch, whatever the replica count.
With `False`, each replica normalises with its own slice's statistics AND, in
Keras 3, each replica's copy of `moving_mean`/`moving_variance` drifts apart:
they are created with `aggregation='none'` and assigned per replica, so the
copies of one MirroredVariable hold different values. A checkpoint keeps
replica 0's, and the Trainer gives every copy replica 0's before it evaluates
(trainer/parts/replica_copies.py), so an evaluation sees the saved model. The
default is True, the same numbers on any replica count; pass False for
per-device ("ghost") batch norm, or to save the all-reduces on a single
device.

References: He et al. 2016, "Deep Residual Learning for Image Recognition"
(CIFAR net of section 4.2, shortcut option A); ResNet-50 "v1.5" (stride in the
3x3 conv of the bottleneck) as in tensorflow/tpu and torchvision.
"""

import dataclasses

import tensorflow as tf

layers = tf.keras.layers


@dataclasses.dataclass(frozen=True)
class _Norm:
  """How every BatchNormalization of one network is made."""
  sync: bool
  momentum: float
  epsilon: float

  def __call__(self, name, zero_gamma=False):
    return layers.BatchNormalization(
        momentum=self.momentum, epsilon=self.epsilon, synchronized=self.sync,
        gamma_initializer='zeros' if zero_gamma else 'ones', name=name)


@tf.keras.utils.register_keras_serializable(package='distloop')
class SubsampleAndPad(layers.Layer):
  """Parameter-free shortcut (option A): stride-s subsampling, zero channels.

  The paper's CIFAR ResNets use it (ResNet-20: 0.27M parameters); a 1x1
  projection (option B) adds ~1% and is `shortcut='projection'`.
  """

  def __init__(self, filters, stride, **kwargs):
    super().__init__(**kwargs)
    self.filters = filters
    self.stride = stride

  def call(self, inputs):
    x = inputs[:, ::self.stride, ::self.stride, :]
    extra = self.filters - inputs.shape[-1]
    return tf.pad(x, [[0, 0], [0, 0], [0, 0], [extra // 2, extra - extra // 2]])

  def compute_output_shape(self, input_shape):
    b, h, w, _ = input_shape
    def down(n):
      return None if n is None else -(-n // self.stride)
    return (b, down(h), down(w), self.filters)

  def get_config(self):
    return {**super().get_config(), 'filters': self.filters,
            'stride': self.stride}


def _conv(filters, kernel_size, stride, name):
  # He-normal as in the paper; no bias, the following batch norm has one.
  # Strided convs pad explicitly (like tensorflow/tpu's `fixed_padding`) so the
  # padding does not depend on the input size, unlike 'same'.
  return layers.Conv2D(
      filters, kernel_size, strides=stride,
      padding='same' if stride == 1 else 'valid', use_bias=False,
      kernel_initializer='he_normal', name=name)


def _strided(x, filters, kernel_size, stride, name):
  if stride > 1 and kernel_size > 1:
    x = layers.ZeroPadding2D(kernel_size // 2, name=f'{name}_pad')(x)
  return _conv(filters, kernel_size, stride, name)(x)


def _logits(x, num_classes, kernel_initializer):
  x = layers.GlobalAveragePooling2D(name='pool')(x)
  # float32 even under a mixed-precision policy: the loss wants float32 logits.
  return layers.Dense(num_classes, kernel_initializer=kernel_initializer,
                      dtype='float32', name='logits')(x)


def _basic_block(x, filters, stride, norm, shortcut, name):
  """conv3x3-BN-ReLU-conv3x3-BN, + shortcut, ReLU (He et al. 2016, v1)."""
  y = _strided(x, filters, 3, stride, f'{name}_conv1')
  y = layers.ReLU(name=f'{name}_relu1')(norm(f'{name}_bn1')(y))
  y = _conv(filters, 3, 1, f'{name}_conv2')(y)
  y = norm(f'{name}_bn2')(y)
  if stride != 1 or x.shape[-1] != filters:
    if shortcut == 'pad':
      x = SubsampleAndPad(filters, stride, name=f'{name}_shortcut')(x)
    else:
      x = _conv(filters, 1, stride, f'{name}_shortcut_conv')(x)
      x = norm(f'{name}_shortcut_bn')(x)
  return layers.ReLU(name=f'{name}_out')(layers.Add(name=f'{name}_add')([x, y]))


def build_cifar_resnet(*, depth: int, num_classes: int, base_filters: int = 16,
                       shortcut: str = 'pad', sync_batch_norm: bool = True,
                       bn_momentum: float = 0.9, bn_epsilon: float = 1e-5,
                       input_shape=(32, 32, 3), name=None) -> tf.keras.Model:
  """CIFAR ResNet of He et al. 2016, section 4.2: depth = 6n + 2.

  A 3x3 conv, then three stages of n basic blocks with base_filters x
  (1, 2, 4) filters (16/32/64), stride 2 at the start of stages 2 and 3,
  global average pooling and a Dense layer. With 10 classes and option-A
  shortcuts ResNet-20 (n=3) has 269,722 trainable parameters and ResNet-56
  (n=9) 853,018 (272,474 and 855,770 with projection shortcuts).

  Args:
    depth: 20, 32, 44, 56, 110, ... (6n + 2 with n >= 1).
    num_classes: width of the logits.
    base_filters: filters of the first stage; 16 in the paper, smaller for
      fast tests.
    shortcut: 'pad' (option A of the paper, parameter-free) or 'projection'
      (option B, 1x1 conv + BN where the shape changes).
    sync_batch_norm: batch statistics over all replicas (see module doc).
    bn_momentum: moving-average momentum of batch norm (Keras convention:
      0.9 means new = 0.9 * old + 0.1 * batch).
    bn_epsilon: batch norm epsilon.
    input_shape: (height, width, channels) of the images.
    name: model name; 'resnet{depth}' by default.

  Returns:
    A functional tf.keras.Model: float [B, H, W, C] -> float32 logits
    [B, num_classes]. Call with training=True to use and update batch stats.

  Raises:
    ValueError: depth is not 6n + 2, or shortcut is unknown.
  """
  if depth < 8 or (depth - 2) % 6:
    raise ValueError(f'depth={depth} is not 6n+2 with n >= 1; CIFAR ResNets '
                     'are 8, 20, 32, 44, 56, 110, ...')
  if shortcut not in ('pad', 'projection'):
    raise ValueError(f"shortcut={shortcut!r} is unknown; use 'pad' or "
                     "'projection'")
  norm = _Norm(sync_batch_norm, bn_momentum, bn_epsilon)
  blocks_per_stage = (depth - 2) // 6
  inputs = tf.keras.Input(shape=input_shape, name='images')
  x = _conv(base_filters, 3, 1, 'stem_conv')(inputs)
  x = layers.ReLU(name='stem_relu')(norm('stem_bn')(x))
  for stage in range(3):
    for block in range(blocks_per_stage):
      stride = 2 if stage > 0 and block == 0 else 1
      x = _basic_block(x, base_filters * 2**stage, stride, norm, shortcut,
                       name=f'stage{stage + 1}_block{block + 1}')
  outputs = _logits(x, num_classes, 'glorot_uniform')
  return tf.keras.Model(inputs, outputs, name=name or f'resnet{depth}')


def _bottleneck(x, filters, stride, norm, zero_init_residual, name):
  """1x1-3x3-1x1 bottleneck, 4x expansion, stride in the 3x3 conv (v1.5)."""
  y = _conv(filters, 1, 1, f'{name}_conv1')(x)
  y = layers.ReLU(name=f'{name}_relu1')(norm(f'{name}_bn1')(y))
  y = _strided(y, filters, 3, stride, f'{name}_conv2')
  y = layers.ReLU(name=f'{name}_relu2')(norm(f'{name}_bn2')(y))
  y = _conv(4 * filters, 1, 1, f'{name}_conv3')(y)
  # Zero gamma makes each block start as the identity (Goyal et al. 2017), as
  # the large-batch recipes do.
  y = norm(f'{name}_bn3', zero_gamma=zero_init_residual)(y)
  if stride != 1 or x.shape[-1] != 4 * filters:
    x = _conv(4 * filters, 1, stride, f'{name}_shortcut_conv')(x)
    x = norm(f'{name}_shortcut_bn')(x)
  return layers.ReLU(name=f'{name}_out')(layers.Add(name=f'{name}_add')([x, y]))


def build_resnet50(*, num_classes: int = 1000, sync_batch_norm: bool = True,
                   bn_momentum: float = 0.9, bn_epsilon: float = 1e-5,
                   zero_init_residual: bool = True, input_shape=(224, 224, 3),
                   name: str = 'resnet50') -> tf.keras.Model:
  """ImageNet ResNet-50 v1.5: bottleneck stages [3, 4, 6, 3].

  7x7/2 conv and 3x3/2 max pool, four stages of 64/128/256/512 x 4 filters,
  global average pooling, Dense. 25,557,032 trainable parameters with 1000
  classes (as torchvision's), plus 53,120 batch-norm moving statistics.

  Args:
    num_classes: width of the logits.
    sync_batch_norm: batch statistics over all replicas (see module doc).
    bn_momentum: moving-average momentum (0.9 as in the TPU recipe).
    bn_epsilon: batch norm epsilon.
    zero_init_residual: zero-initialise the last batch-norm gamma of each
      block, as large-batch recipes do.
    input_shape: (height, width, channels); any size >= 32 works.
    name: model name.

  Returns:
    A functional tf.keras.Model: float [B, H, W, C] -> float32 logits
    [B, num_classes].
  """
  norm = _Norm(sync_batch_norm, bn_momentum, bn_epsilon)
  inputs = tf.keras.Input(shape=input_shape, name='images')
  x = _strided(inputs, 64, 7, 2, 'stem_conv')
  x = layers.ReLU(name='stem_relu')(norm('stem_bn')(x))
  x = layers.ZeroPadding2D(1, name='stem_pool_pad')(x)
  x = layers.MaxPooling2D(3, strides=2, name='stem_pool')(x)
  for stage, (filters, blocks) in enumerate(zip((64, 128, 256, 512),
                                                (3, 4, 6, 3))):
    for block in range(blocks):
      stride = 2 if stage > 0 and block == 0 else 1
      x = _bottleneck(x, filters, stride, norm, zero_init_residual,
                      name=f'stage{stage + 1}_block{block + 1}')
  # Small logits at init, as in the TPU and Model Garden recipes.
  outputs = _logits(x, num_classes,
                    tf.keras.initializers.RandomNormal(stddev=0.01))
  return tf.keras.Model(inputs, outputs, name=name)
