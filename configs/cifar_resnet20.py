"""ResNet-20 (He et al. 2016, CIFAR net) on 32x32 images from TFRecords.

The default is the paper's CIFAR-10 recipe on your own TFRecords, made from
image folders with input.make_tfrecords (docs/models.md, "Image classification"):
e.g. CIFAR-10 exported as cifar10/{train,test}/<class>/*.png.

Command:   python -m input.make_tfrecords --images=cifar10/train \
               --output=/data/cifar10 --num_shards=16 --split=train
           python -m input.make_tfrecords --images=cifar10/test \
               --output=/data/cifar10 --num_shards=4 --split=eval
           python main.py --config=configs/cifar_resnet20.py \
               --config.data.train_pattern='/data/cifar10/train-*' \
               --config.data.eval_pattern='/data/cifar10/eval-*'
Runtime:   64,000 steps of batch 128: ~6 h on 2 CPU cores (~0.3 s/step), far
           less on a GPU; the `shapes` variant shows it learn in minutes.
Expected:  CIFAR-10 test accuracy ~0.91-0.92 (the paper reports 0.9125 for
           ResNet-20); not measured here (no CIFAR-10 is shipped).

Variants (after ':'):
  shapes     the generated shapes set (4 classes, chance 0.25), measured on
             2 CPU cores:
               python -m input.shapes --output=/tmp/shapes --per_class=1000
               python -m input.make_tfrecords --images=/tmp/shapes \
                   --output=/tmp/shapes_tfrecords --num_shards=8 \
                   --eval_fraction=0.2
               python main.py --config=configs/cifar_resnet20.py:shapes \
                   --mode=train_and_eval
             Runtime ~4-6 min (1,500 steps of batch 64).
             Expected: final eval accuracy ~0.99 on the 800 held-out images.
             Measured here: 0.9938 (loss 0.0216) at step 1,500; 0.955 at
             step 500, 0.9925 at 1,000; 6 min 10 s on 2 shared CPU cores.
  synthetic  generated images in memory (input/synthetic_images.py), no files:
             throughput and a smoke test of the full-size net; the label is
             the mean brightness, so accuracy climbs above chance (0.1).
  smoke      4 steps of a tiny ResNet-20 on synthetic 16x16 images (tests).
"""

import ml_collections

VARIANTS = ('default', 'shapes', 'synthetic', 'smoke')
# He et al. use L2 1e-4 added to the loss, with momentum 0.9. The optimizer's
# weight decay is decoupled (w -= lr * wd * w each step); the L2 term, summed
# by momentum, shrinks w by lr * L2 / (1 - momentum) per step, so the same
# regularisation is wd = L2 / (1 - momentum) = 1e-3.
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-3  # = L2 1e-4 / (1 - MOMENTUM)


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  """What differs from the framework's defaults (trainer/schema.py)."""
  config = ml_collections.ConfigDict()
  config.trainer = 'image_classifier'
  config.data = dict(
      name='tfrecord',                 # or 'synthetic'
      train_pattern='',                # e.g. '/data/cifar10/train-*'
      eval_pattern='',                 # e.g. '/data/cifar10/eval-*'
      image_size=32,
      augment='pad_and_crop',          # CIFAR: pad 4, random crop, flip
      eval_crop_padding=0,             # eval on the whole 32x32 image
      label_offset=0,                  # make_tfrecords labels start at 0
      shard_policy='auto',             # file-level when files >= hosts
      shuffle_buffer=50_000,           # the whole CIFAR training set
      synthetic_examples=2048)         # data.name='synthetic' pool size
  config.model = dict(
      name='resnet20',                 # resnet8/20/32/44/56/110
      num_classes=10,
      base_filters=16,                 # 16/32/64 filters, as in the paper
      sync_batch_norm=True,            # batch statistics over all replicas
      bn_momentum=0.9,
      label_smoothing=0.0)
  config.train = dict(steps=64_000, global_batch_size=128, precision='float32')
  config.checkpoint = dict(every_steps=2000)
  config.eval = dict(global_batch_size=500, split='eval', every_steps=2000,
                     best_metric='accuracy')
  config.optimizer = dict(
      name='sgd', learning_rate=0.1, momentum=MOMENTUM,
      weight_decay=WEIGHT_DECAY,
      weight_decay_exclude=('bias', 'gamma', 'beta'),  # BN too
      schedule='step',                 # /10 at 32k and 48k steps (the paper)
      step_boundaries=(32_000, 48_000), step_factor=0.1)

  if variant == 'shapes':
    config.data.train_pattern = '/tmp/shapes_tfrecords/train-*'
    config.data.eval_pattern = '/tmp/shapes_tfrecords/eval-*'
    config.data.shuffle_buffer = 10_000
    config.model.num_classes = 4
    _short_cosine(config, steps=1500, batch=64)
    config.optimizer.learning_rate = 0.05  # 0.1 x 64 / 128, linear scaling
  elif variant == 'synthetic':
    config.data.name = 'synthetic'
    _short_cosine(config, steps=500, batch=128)
  elif variant == 'smoke':
    config.data.name = 'synthetic'
    config.data.image_size = 16
    config.data.synthetic_examples = 64
    config.model.base_filters = 4
    config.eval.global_batch_size = 16
    _short_cosine(config, steps=4, batch=8)
    config.train.steps_per_loop = 2
    config.checkpoint.every_steps = 2
    config.summary = dict(input_wait_every_loops=0)  # one graph, not two
  return config


def _short_cosine(config, *, steps, batch):
  """A short run: warmup over the first 5% then cosine decay to 0."""
  config.train.steps = steps
  config.train.global_batch_size = batch
  config.optimizer.schedule = 'cosine'
  config.optimizer.warmup_steps = steps // 20
  config.optimizer.step_boundaries = ()
  config.checkpoint.every_steps = max(steps // 3, 1)
  config.eval.every_steps = max(steps // 3, 1)
