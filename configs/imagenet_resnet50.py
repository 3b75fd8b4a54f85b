"""ResNet-50 v1.5 on ImageNet: the TPU recipe, 90 epochs at global batch 1024.

SGD with Nesterov momentum 0.9, learning rate 0.1 x batch / 256 = 0.4 with a
linear warmup over 5 epochs then cosine decay to 0, weight decay (the
recipe's L2 1e-4; see WEIGHT_DECAY) on every kernel but not on batch norm or
biases, label smoothing 0.1, bfloat16 compute with float32 weights and
logits, synchronised batch norm (momentum 0.9), the last batch-norm gamma of
each block initialised to zero, random-resized crops and flips at 224x224,
central 87.5% crops for eval.

Data: the standard ImageNet TFRecords (1,024 train-* and 128 validation-*
shards, written by the ImageNet conversion scripts, labels 1..1000:
data.label_offset=1), or any DIR/<class>/*.JPEG folder converted with
`python -m input.make_tfrecords` (labels from 0: set data.label_offset=0).

Command:   python main.py --strategy=tpu --tpu=local \
               --config=configs/imagenet_resnet50.py --mode=train_and_eval \
               --config.data.train_pattern='gs://BUCKET/imagenet/train-*' \
               --config.data.eval_pattern='gs://BUCKET/imagenet/validation-*' \
               --model_dir=gs://BUCKET/runs/resnet50
Runtime:   112,603 steps; hours on a TPU v3-8 / v4-8 (not measured here: no
           TPU or GPU and no ImageNet are available; on a 2-core CPU one
           step takes minutes).
Expected:  top-1 ~0.76-0.77, top-5 ~0.93 on the 50,000 validation images
           (published for this recipe; not measured here).

Variants (after ':'):
  synthetic  the full recipe on generated 224x224 images (no files): input-
             independent throughput on the accelerator.
  smoke      2 steps of ResNet-50 on 64x64 synthetic images, batch 4, float32
             (tests; ~30 s on a CPU, mostly graph building).
"""

import ml_collections

VARIANTS = ('default', 'synthetic', 'smoke')
TRAIN_IMAGES = 1_281_167
EPOCHS = 90
WARMUP_EPOCHS = 5
BATCH = 1024
MOMENTUM = 0.9
# The recipe adds L2 1e-4 to the loss; with momentum 0.9 that shrinks each
# kernel by lr * 1e-4 / (1 - 0.9) per step. The optimizer's weight decay is
# decoupled (w -= lr * wd * w), so the same regularisation is wd = 1e-3.
WEIGHT_DECAY = 1e-3  # = 1e-4 / (1 - MOMENTUM)


def _steps(epochs: float) -> int:
  return -(-int(epochs * TRAIN_IMAGES) // BATCH)  # ceil


def get_config(variant: str = 'default') -> ml_collections.ConfigDict:
  variant = variant or 'default'
  if variant not in VARIANTS:
    raise ValueError(f'config variant {variant!r} is unknown in '
                     'configs/imagenet_resnet50.py; valid: '
                     f'{", ".join(VARIANTS)}')
  config = ml_collections.ConfigDict()
  config.trainer = 'image_classifier'
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = 'tfrecord'       # or 'synthetic'
  config.data.train_pattern = ''      # e.g. 'gs://BUCKET/imagenet/train-*'
  config.data.eval_pattern = ''       # e.g. '.../imagenet/validation-*'
  config.data.image_size = 224
  config.data.augment = 'random_resized_crop'
  config.data.eval_crop_padding = 32  # central 224/256 of the shorter side
  config.data.label_offset = 1        # ImageNet scripts number from 1
  config.data.shard_policy = 'auto'   # file-level when files >= hosts
  config.data.shuffle_buffer = 10_000  # records per host
  config.data.synthetic_examples = 1024  # data.name='synthetic' pool size
  config.data.pipeline = 'per_host'   # or 'global'
  config.data.auto_shard = 'data'     # used by pipeline='global'

  config.model = ml_collections.ConfigDict()
  config.model.name = 'resnet50'
  config.model.num_classes = 1000
  config.model.base_filters = 64      # fixed for resnet50 (CIFAR nets only)
  config.model.sync_batch_norm = True
  config.model.bn_momentum = 0.9

  config.train = ml_collections.ConfigDict()
  config.train.steps = _steps(EPOCHS)  # 112,603
  config.train.global_batch_size = BATCH
  config.train.steps_per_loop = 500
  config.train.clip_norm = 0.0
  config.train.nan_retries = 0
  config.train.label_smoothing = 0.1
  config.train.precision = 'mixed_bfloat16'  # float32 | mixed_float16 | ...
  config.train.grad_accum_steps = 1
  config.train.jit_compile = False
  config.train.ema_decay = 0.0

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 5000
  config.checkpoint.max_to_keep = 3
  config.checkpoint.async_save = True

  config.eval = ml_collections.ConfigDict()
  config.eval.global_batch_size = 1024
  config.eval.split = 'eval'
  config.eval.every_steps = 5000      # with --mode=train_and_eval (~4 epochs)
  config.eval.timeout_secs = 3600
  config.eval.best_metric = 'accuracy'
  config.eval.best_mode = 'max'
  config.eval.patience = 0

  config.summary = ml_collections.ConfigDict()
  config.summary.every_steps = 500
  config.summary.input_wait_every_loops = 10

  config.log = ml_collections.ConfigDict()
  config.log.every_secs = 0.0

  config.export = ml_collections.ConfigDict()
  config.export.at_end = False

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 0.1 * BATCH / 256
  config.optimizer.momentum = MOMENTUM
  config.optimizer.nesterov = True
  config.optimizer.weight_decay = WEIGHT_DECAY
  config.optimizer.weight_decay_exclude = ('bias', 'gamma', 'beta')
  config.optimizer.schedule = 'cosine'
  config.optimizer.warmup_steps = _steps(WARMUP_EPOCHS)  # 6,256

  if variant == 'synthetic':
    config.data.name = 'synthetic'
    config.train.steps = 2000
    config.optimizer.warmup_steps = 100
  elif variant == 'smoke':
    config.data.name = 'synthetic'
    config.data.image_size = 64
    config.data.synthetic_examples = 16
    config.train.steps = 2
    config.train.global_batch_size = 4
    config.train.steps_per_loop = 2
    config.train.precision = 'float32'
    config.eval.global_batch_size = 8
    config.checkpoint.every_steps = 2
    config.summary.every_steps = 2
    config.summary.input_wait_every_loops = 0  # one graph to build, not two
    config.optimizer.learning_rate = 0.1 * 4 / 256
    config.optimizer.warmup_steps = 1
  return config
