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


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  """What differs from the framework's defaults (trainer/schema.py)."""
  config = ml_collections.ConfigDict()
  config.trainer = 'image_classifier'
  config.data = dict(
      name='tfrecord',                 # or 'synthetic'
      train_pattern='',                # e.g. 'gs://BUCKET/imagenet/train-*'
      eval_pattern='',                 # e.g. '.../imagenet/validation-*'
      image_size=224,
      augment='random_resized_crop',
      eval_crop_padding=32,            # central 224/256 of the shorter side
      label_offset=1,                  # ImageNet scripts number from 1
      shard_policy='auto',             # file-level when files >= hosts
      shuffle_buffer=10_000,           # records per host
      synthetic_examples=1024)         # data.name='synthetic' pool size
  config.model = dict(
      name='resnet50', num_classes=1000,
      base_filters=64,                 # fixed for resnet50 (CIFAR nets only)
      sync_batch_norm=True, bn_momentum=0.9, label_smoothing=0.1)
  config.train = dict(steps=_steps(EPOCHS),  # 112,603
                      global_batch_size=BATCH, steps_per_loop=500,
                      precision='mixed_bfloat16')
  config.checkpoint = dict(every_steps=5000)
  config.eval = dict(global_batch_size=1024, split='eval',
                     every_steps=5000,  # with --mode=train_and_eval (~4 epochs)
                     timeout_secs=3600.0, best_metric='accuracy')
  config.optimizer = dict(
      name='sgd', learning_rate=0.1 * BATCH / 256, momentum=MOMENTUM,
      nesterov=True, weight_decay=WEIGHT_DECAY,
      weight_decay_exclude=('bias', 'gamma', 'beta'), schedule='cosine',
      warmup_steps=_steps(WARMUP_EPOCHS))  # 6,256

  if variant == 'synthetic':
    config.data.name = 'synthetic'
    config.train.steps = 2000
    config.optimizer.warmup_steps = 100
  elif variant == 'smoke':
    config.data.name = 'synthetic'
    config.data.image_size = 64
    config.data.synthetic_examples = 16
    config.train.update(steps=2, global_batch_size=4, steps_per_loop=2,
                        precision='float32')
    config.eval.global_batch_size = 8
    config.checkpoint.every_steps = 2
    config.summary = dict(input_wait_every_loops=0)  # one graph, not two
    config.optimizer.learning_rate = 0.1 * 4 / 256
    config.optimizer.warmup_steps = 1
  return config
