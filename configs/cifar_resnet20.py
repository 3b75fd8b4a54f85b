"""ResNet-20 (He et al. 2016, CIFAR net) on 32x32 images from TFRecords.

The default is the paper's CIFAR-10 recipe on your own TFRecords, made from
image folders with input.make_tfrecords (README, "Image classification"):
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


def get_config(variant: str = 'default') -> ml_collections.ConfigDict:
  variant = variant or 'default'
  if variant not in VARIANTS:
    raise ValueError(f'config variant {variant!r} is unknown in '
                     f'configs/cifar_resnet20.py; valid: {", ".join(VARIANTS)}')
  config = ml_collections.ConfigDict()
  config.trainer = 'image_classifier'
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = 'tfrecord'       # or 'synthetic'
  config.data.train_pattern = ''      # e.g. '/data/cifar10/train-*'
  config.data.eval_pattern = ''       # e.g. '/data/cifar10/eval-*'
  config.data.image_size = 32
  config.data.augment = 'pad_and_crop'  # CIFAR: pad 4, random crop, flip
  config.data.eval_crop_padding = 0   # eval on the whole 32x32 image
  config.data.label_offset = 0        # make_tfrecords labels start at 0
  config.data.shard_policy = 'auto'   # file-level when files >= hosts
  config.data.shuffle_buffer = 50_000  # the whole CIFAR training set
  config.data.synthetic_examples = 2048  # data.name='synthetic' pool size
  config.data.pipeline = 'per_host'   # or 'global'
  config.data.auto_shard = 'data'     # used by pipeline='global'

  config.model = ml_collections.ConfigDict()
  config.model.name = 'resnet20'      # resnet8/20/32/44/56/110
  config.model.num_classes = 10
  config.model.base_filters = 16      # 16/32/64 filters, as in the paper
  config.model.sync_batch_norm = True  # batch statistics over all replicas
  config.model.bn_momentum = 0.9

  config.train = ml_collections.ConfigDict()
  config.train.steps = 64_000
  config.train.global_batch_size = 128
  config.train.steps_per_loop = 100
  config.train.clip_norm = 0.0        # global-norm clipping; 0 disables
  config.train.nan_retries = 0        # restore + skip the bad batch, K times
  config.train.label_smoothing = 0.0
  config.train.precision = 'float32'  # or mixed_float16 / mixed_bfloat16
  config.train.grad_accum_steps = 1
  config.train.jit_compile = False
  config.train.ema_decay = 0.0        # 0: no moving average of the weights

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 2000
  config.checkpoint.max_to_keep = 3
  config.checkpoint.async_save = True

  config.eval = ml_collections.ConfigDict()
  config.eval.global_batch_size = 500
  config.eval.split = 'eval'
  config.eval.every_steps = 2000      # with --mode=train_and_eval
  config.eval.timeout_secs = 600      # --mode=continuous_eval gives up after
  config.eval.best_metric = 'accuracy'  # kept in model_dir/best; '' for none
  config.eval.best_mode = 'max'
  config.eval.patience = 0            # early stop after N evals; 0: never

  config.summary = ml_collections.ConfigDict()
  config.summary.every_steps = 100    # TensorBoard train scalars every N steps
  config.summary.input_wait_every_loops = 10

  config.log = ml_collections.ConfigDict()
  config.log.every_secs = 0.0         # 0: one progress line per inner loop

  config.export = ml_collections.ConfigDict()
  config.export.at_end = False        # SavedModel in model_dir/export

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = MOMENTUM
  config.optimizer.nesterov = False
  config.optimizer.weight_decay = WEIGHT_DECAY
  config.optimizer.weight_decay_exclude = ('bias', 'gamma', 'beta')  # BN too
  config.optimizer.schedule = 'step'  # /10 at 32k and 48k steps (the paper)
  config.optimizer.warmup_steps = 0
  config.optimizer.step_boundaries = (32_000, 48_000)
  config.optimizer.step_factor = 0.1

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
    config.train.global_batch_size = 8
    config.eval.global_batch_size = 16
    _short_cosine(config, steps=4, batch=8)
    config.train.steps_per_loop = 2
    config.checkpoint.every_steps = 2
    config.summary.every_steps = 2
    config.summary.input_wait_every_loops = 0  # one graph to build, not two
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
