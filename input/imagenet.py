"""ImageNet-format TFRecords: sharded, deterministic reading and preprocessing.

Records are tf.train.Examples with `image/encoded` (JPEG bytes) and
`image/class/label` (int64), optionally `image/class/text`: the layout of the
ImageNet conversion scripts and of `python -m input.make_tfrecords`. Those
scripts number ImageNet's classes 1..1000; make_tfrecords numbers from 0.
`label_offset` is subtracted from every label (1 for the former, 0 for the
latter), and with `num_classes` a label outside [0, num_classes) stops the
run with an error naming `data.label_offset`, not a silent NaN.

Preprocessing (the ResNet recipe of tensorflow/tpu):
  train, augment='random_resized_crop': a crop of 8%-100% of the area and
    aspect ratio 3/4-4/3 (sample_distorted_bounding_box; the central crop
    when 10 attempts fail), decoded alone with decode_and_crop_jpeg, resized
    to image_size, flipped left-right with probability 1/2.
  train, augment='pad_and_crop': the CIFAR recipe for small images: the whole
    image resized to image_size, padded by 4 pixels, a random image_size
    crop, a random flip.
  eval: the central square of image_size / (image_size + crop_padding) of
    the shorter side (crop_padding 32: 224/256 = 0.875), resized. For
    CIFAR-size images use crop_padding=0 (the whole image).
  then (pixel - ImageNet mean) / ImageNet std, per RGB channel, float32.

Determinism. The training stream is a pure function of the seed and the
files: the file order (sorted, then shuffled with the seed every epoch), the
interleave (fixed cycle length, deterministic order even with parallel
reads), the shuffle buffer of encoded records (repeat comes after it, so an
epoch reads every record once), and the augmentation, whose randomness is
stateless, seeded per example by (seed, pipeline, position in the stream),
so parallel decoding cannot reorder random draws. Skipping k batches of a
fresh pipeline therefore gives the k+1-th batch of the first one: the exact
resume of trainer/trainer.py (`distribute_dataset(skip_batches=...)`).

Sharding across input pipelines (hosts), `shard_policy`:
  'file'  pipeline p reads the sorted files p, p + P, p + 2P, ... (P
          pipelines): each file is read by one host. Needs at least P files.
  'data'  every pipeline reads every file; for training each keeps its
          contiguous slice of every global batch (the scheme of
          input/pipeline.py), for eval every P-th record. P times the reads.
  'auto'  'file' when there are at least P files, else 'data'.
With one pipeline (one host) all three read the same stream.

The trade-off: with 'data' the global order of training examples does not
depend on P, so a run on 1 host and on 4 hosts sees the same global batches
(and, with the same replica count, the same weights). With 'file' the global
batch k is made of the k-th per-replica batches of P different streams: the
order depends on P (as with every file-sharded reader). Resume stays exact
as long as the run continues with the same number of hosts; a resume on a
different number of hosts continues with a different, equally random stream.

Eval reads every example exactly once, in order (the sorted files, each from
start to end; every P-th record under 'data'), and keeps the partial last
batch; the Trainer's eval sums per-example values, so any split of the
records between pipelines gives the same metrics.
"""

import tensorflow as tf

from trainer.errors import UserError

MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
SHARD_POLICIES = ('auto', 'file', 'data')
AUGMENTS = ('random_resized_crop', 'pad_and_crop', 'none')
CYCLE_LENGTH = 16  # Files read at once; fixed, as it sets the order.
FEATURES = {
    'image/encoded': tf.io.FixedLenFeature([], tf.string),
    'image/class/label': tf.io.FixedLenFeature([], tf.int64),
    'image/class/text': tf.io.FixedLenFeature([], tf.string, default_value=''),
}


def list_files(file_pattern: str, key: str) -> list[str]:
  """The sorted files matching `file_pattern` (config key `key`).

  Raises:
    UserError: the pattern is empty or matches nothing.
  """
  fix = ('make TFRecords from a DIR/<class>/*.jpg folder with python -m '
         'input.make_tfrecords --images=DIR --output=OUT and pass '
         f"--config.{key}='OUT/{key.rsplit('.', 1)[-1].split('_')[0]}-*'")
  if not file_pattern:
    raise UserError(f'config key {key} is empty; {fix}')
  files = sorted(tf.io.gfile.glob(file_pattern))
  if not files:
    raise UserError(f'config key {key}={file_pattern!r} matches no files; '
                    f'{fix}')
  return files


def choose_sharding(policy: str, *, num_files: int, num_pipelines: int,
                    key: str = 'data.train_pattern') -> str:
  """'file' or 'data' for `policy` (see the module docstring).

  Raises:
    UserError: an unknown policy, or 'file' with fewer files than pipelines.
  """
  if policy not in SHARD_POLICIES:
    raise UserError(f'config key data.shard_policy={policy!r} is unknown; '
                    f'valid: {", ".join(SHARD_POLICIES)}')
  if policy == 'auto':
    return 'file' if num_files >= num_pipelines else 'data'
  if policy == 'file' and num_files < num_pipelines:
    raise UserError(
        f"config key data.shard_policy='file' needs a file per input "
        f'pipeline, but {key} matches {num_files} file(s) for '
        f'{num_pipelines} input pipelines; write at least {num_pipelines} '
        'shards (python -m input.make_tfrecords --num_shards=N) or set '
        "--config.data.shard_policy=data (every host reads every file)")
  return policy


def check(patterns: dict[str, str], *, shard_policy: str, augment: str,
          num_pipelines: int) -> None:
  """Raises now the UserError that `dataset` would raise later.

  For a Trainer's constructor: a run then stops before it writes anything.

  Args:
    patterns: {config key: file pattern}, e.g. {'data.train_pattern': ...}.
    shard_policy, augment: as for `dataset`.
    num_pipelines: the input pipelines (hosts) that will read the files.
  """
  _check_augment(augment)
  for key, pattern in patterns.items():
    choose_sharding(shard_policy, num_files=len(list_files(pattern, key)),
                    num_pipelines=num_pipelines, key=key)


def dataset(split: str, *, input_context: tf.distribute.InputContext,
            batch_size: int, training: bool, seed: int, file_pattern: str,
            image_size: int, shard_policy: str = 'auto',
            shuffle_buffer: int = 10_000,
            augment: str = 'random_resized_crop', crop_padding: int = 32,
            label_offset: int = 0, num_classes: int = 0,
            pattern_key: str = '') -> tf.data.Dataset:
  """Batched (images float32 [B, S, S, 3], labels int32 [B]) for one pipeline.

  Args:
    split: the split's name, for messages; its files are `file_pattern`.
    input_context: which input pipeline this is (see the Trainer's dataset).
    batch_size: the batch this pipeline emits (per replica from a dataset
      function, global with a single-pipeline context).
    training: shuffle, augment, repeat forever and drop the partial last
      batch; otherwise read once, in order, keeping the partial batch.
    seed: the seed of every shuffle and random crop.
    file_pattern: a glob of TFRecord files (local or gs://).
    image_size: S, the height and width of the output images.
    shard_policy: 'auto', 'file' or 'data' (module docstring).
    shuffle_buffer: records in the shuffle buffer (training); they are still
      encoded, ~110 KB each for ImageNet.
    augment: 'random_resized_crop', 'pad_and_crop' or 'none' (training).
    crop_padding: eval center crop: image_size / (image_size + crop_padding)
      of the shorter side; 0 keeps the whole shorter side.
    label_offset: subtracted from every label (1 for 1-based ImageNet).
    num_classes: when > 0, a label outside [0, num_classes) is an error.
    pattern_key: the config key of `file_pattern`, for messages (default
      data.<split>_pattern).

  Raises:
    UserError: no files, an unknown policy or augmentation, or 'file'
      sharding with fewer files than input pipelines.
  """
  key = pattern_key or f'data.{split}_pattern'
  _check_augment(augment)
  files = list_files(file_pattern, key)
  pipelines = input_context.num_input_pipelines
  pipeline_id = input_context.input_pipeline_id
  sharding = choose_sharding(shard_policy, num_files=len(files),
                             num_pipelines=pipelines, key=key)
  if sharding == 'file':
    files = files[pipeline_id::pipelines]
  ds = tf.data.Dataset.from_tensor_slices(files)
  parse = _parser(image_size=image_size, training=training, augment=augment,
                  crop_padding=crop_padding, label_offset=label_offset,
                  num_classes=num_classes)

  if not training:
    ds = tf.data.TFRecordDataset(ds)  # one file after the other
    if sharding == 'data' and pipelines > 1:
      ds = ds.shard(pipelines, pipeline_id)
    ds = ds.map(lambda record: parse(record, None),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

  # Repeat last: each epoch then reads every record once, in a new order.
  ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
  ds = ds.interleave(
      tf.data.TFRecordDataset, cycle_length=CYCLE_LENGTH, block_length=1,
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  ds = ds.repeat()
  # Position in this pipeline's stream: it seeds the example's augmentation.
  # Under 'data' it is the position in the stream every pipeline shares, so
  # an example is cropped the same way whatever the number of pipelines.
  ds = ds.enumerate()
  if sharding == 'data' and pipelines > 1:
    # Keep this pipeline's contiguous slice of every global batch, as
    # input/pipeline.finish does, before anything is decoded.
    global_batch = batch_size * input_context.num_replicas_in_sync
    per_pipeline = global_batch // pipelines
    ds = ds.filter(
        lambda i, _: (i % global_batch) // per_pipeline == pipeline_id)
    # Still endless: said so, a multi-worker strategy needs no extra
    # all-reduce per step to agree on "has data" (input/pipeline.finish).
    ds = ds.apply(tf.data.experimental.assert_cardinality(
        tf.data.INFINITE_CARDINALITY))
  stream = tf.constant([seed, pipeline_id if sharding == 'file' else 0],
                       tf.int64)
  ds = ds.map(
      lambda i, record: parse(
          record, tf.random.experimental.stateless_fold_in(stream, i)),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def _check_augment(augment):
  if augment not in AUGMENTS:
    raise UserError(f'config key data.augment={augment!r} is unknown; valid: '
                    f'{", ".join(AUGMENTS)}')


def normalize(images: tf.Tensor) -> tf.Tensor:
  """uint8 or float pixels in [0, 255] -> (x - mean) / std, float32."""
  images = tf.cast(images, tf.float32)
  return (images - MEAN_RGB) / STDDEV_RGB


def _parser(*, image_size, training, augment, crop_padding, label_offset,
            num_classes):
  """Returns parse(record, seed) -> (image [S, S, 3] float32, label int32)."""
  def parse(record, seed):
    example = tf.io.parse_single_example(record, FEATURES)
    jpeg = example['image/encoded']
    if training and augment == 'random_resized_crop':
      crop_seed, flip_seed = tf.unstack(
          tf.random.experimental.stateless_split(seed, 2))
      image = _random_resized_crop(jpeg, image_size, crop_padding, crop_seed)
    elif training and augment == 'pad_and_crop':
      crop_seed, flip_seed = tf.unstack(
          tf.random.experimental.stateless_split(seed, 2))
      image = _resize(tf.io.decode_jpeg(jpeg, channels=3), image_size)
      image = tf.image.pad_to_bounding_box(image, 4, 4, image_size + 8,
                                           image_size + 8)
      image = tf.image.stateless_random_crop(
          image, [image_size, image_size, 3], crop_seed)
    else:
      image = _center_crop(jpeg, image_size, crop_padding)
    if training and augment != 'none':
      image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    image = tf.ensure_shape(normalize(image), [image_size, image_size, 3])
    label = tf.cast(example['image/class/label'], tf.int32) - label_offset
    if num_classes:
      check = tf.debugging.Assert(
          (label >= 0) & (label < num_classes),
          [f'a label minus data.label_offset={label_offset} is outside [0, '
           f'{num_classes}) (model.num_classes): set data.label_offset=1 for '
           '1-based (ImageNet-script) labels, 0 for make_tfrecords ones; '
           'label:', label])
      with tf.control_dependencies([check]):
        label = tf.identity(label)
    return image, label
  return parse


def _resize(image, image_size):
  return tf.image.resize(image, [image_size, image_size])


def _center_window(shape, image_size, crop_padding):
  """[y, x, h, w] of the central square crop (tensorflow/tpu's eval crop)."""
  height, width = shape[0], shape[1]
  side = tf.cast(
      image_size / (image_size + crop_padding) *
      tf.cast(tf.minimum(height, width), tf.float64), tf.int32)
  return tf.stack([(height - side + 1) // 2, (width - side + 1) // 2,
                   side, side])


def _center_crop(jpeg, image_size, crop_padding):
  window = _center_window(tf.io.extract_jpeg_shape(jpeg), image_size,
                          crop_padding)
  return _resize(tf.io.decode_and_crop_jpeg(jpeg, window, channels=3),
                 image_size)


def _random_resized_crop(jpeg, image_size, crop_padding, seed):
  shape = tf.io.extract_jpeg_shape(jpeg)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
      seed=seed, min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(0.08, 1.0), max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  # After 10 failed attempts the sampler returns the whole image; like
  # tensorflow/tpu, take the eval crop instead.
  failed = tf.reduce_all(tf.equal(size[:2], shape[:2]))
  window = tf.where(failed, _center_window(shape, image_size, crop_padding),
                    window)
  return _resize(tf.io.decode_and_crop_jpeg(jpeg, window, channels=3),
                 image_size)
