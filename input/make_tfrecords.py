"""Converts a folder of class sub-folders of images into ImageNet-format TFRecords.

  python -m input.make_tfrecords --images=DIR --output=OUT \
      [--num_shards=8] [--eval_fraction=0.2 --seed=0 | --split=train|eval]

reads `DIR/<class_name>/*.{jpg,jpeg,png,bmp,gif}` and writes
`OUT/train-00000-of-00008` ... and, with --eval_fraction > 0,
`OUT/eval-00000-of-00008` ..., plus `OUT/labels.txt` (line i: the class name
of label i). Labels are the sorted class-folder names, numbered from 0.

Each record is a tf.train.Example in the layout of the ImageNet conversion
scripts, which `input/imagenet.py` reads: `image/encoded` (JPEG bytes),
`image/class/label` (int64), `image/class/text` (the class name),
`image/format`, `image/filename`, `image/height`, `image/width`. JPEG files
are copied byte for byte (after a check that they decode); other formats are
decoded and re-encoded as JPEG (quality 95, no chroma subsampling), because
the reader decodes with `decode_and_crop_jpeg`, which decodes only the crop
it needs.

The eval split takes round(eval_fraction x n) images of each class (so every
class is in both splits), drawn with --seed. A set that comes with its own
split (CIFAR-10's test images, ImageNet's validation images sorted into class
folders) is converted one folder at a time into the same --output:
--split=train for one, --split=eval for the other; labels.txt must then list
the same classes, or the second command stops (the labels would not match).
Both splits are shuffled with
--seed before being cut into shards, so every shard holds every class: the
reader's file-level sharding and its shuffle buffer then see mixed classes.
A split gets min(--num_shards, its image count) shards. Paths may be local or
any filesystem tf.io.gfile reads (gs://...). The conversion is one process
that decodes every image once to check it: thousands of small images a
second, a few hundred ImageNet-size ones (an hour or two for ImageNet: use
its existing TFRecords when you have them).

Bad input (a missing folder, no class folders, no images, an image that does
not decode, an --output that already holds shards) stops with one line on
stderr and exit status 2, leaving no shard behind.
"""

import os
import re

from absl import app
from absl import flags
import numpy as np

from trainer.experiment import cli
from trainer import errors
from trainer.errors import UserError

EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
SHARD_NAME = re.compile(r'^(train|eval)-\d{5}-of-\d{5}$')
SPLITS = ('auto', 'train', 'eval')
FLAGS = flags.FLAGS


def define_flags():
  """The command's flags; defined only when run as a command."""
  flags.DEFINE_string('images', None, 'Folder of DIR/<class_name>/<image> '
                      'files.')
  flags.DEFINE_string('output', None, 'Folder to write the TFRecord shards '
                      'and labels.txt into.')
  flags.DEFINE_integer('num_shards', 8, 'Shards per split (at most one per '
                       'image); at least as many as the input pipelines '
                       '(hosts) that will read them, for file-level sharding.')
  flags.DEFINE_float('eval_fraction', 0.0, 'Fraction of each class written '
                     'to the eval split; 0 writes only train.')
  flags.DEFINE_integer('seed', 0, 'Seed of the eval split and the shuffles.')
  flags.DEFINE_enum('split', 'auto', SPLITS, 'auto: train, and eval with '
                    '--eval_fraction; train or eval: every image to that split '
                    '(for sets with their own test folder).')


def find_images(images_dir: str) -> tuple[list[str], list[list[str]]]:
  """Returns (sorted class names, per class: sorted image paths).

  Raises:
    UserError: the folder is missing, has no class folders, or no images.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  if not tf.io.gfile.isdir(images_dir):
    raise UserError(f'flag --images={images_dir!r} is not a directory; pass '
                    'a folder laid out as DIR/<class_name>/*.jpg')
  classes = sorted(name.rstrip('/') for name in tf.io.gfile.listdir(images_dir)
                   if tf.io.gfile.isdir(os.path.join(images_dir, name)))
  if not classes:
    raise UserError(f'flag --images={images_dir!r} has no class folders; '
                    'put the images of each class in a sub-folder named after '
                    'it: DIR/<class_name>/*.jpg')
  paths = []
  for name in classes:
    folder = os.path.join(images_dir, name)
    paths.append(sorted(
        os.path.join(folder, f) for f in tf.io.gfile.listdir(folder)
        if f.lower().endswith(EXTENSIONS)))
  if not any(paths):
    raise UserError(f'flag --images={images_dir!r}: its class folders '
                    f'({", ".join(classes[:5])}{"..." if len(classes) > 5 else ""}) '
                    f'hold no images ({", ".join(EXTENSIONS)}); put the image '
                    'files in DIR/<class_name>/')
  return classes, paths


def split(paths: list[list[str]], *, eval_fraction: float, seed: int):
  """Returns (train, eval) lists of (path, label), each shuffled with seed."""
  rng = np.random.default_rng(seed)
  train, evals = [], []
  for label, files in enumerate(paths):
    files = [files[i] for i in rng.permutation(len(files))]
    n_eval = int(round(eval_fraction * len(files)))
    evals += [(f, label) for f in files[:n_eval]]
    train += [(f, label) for f in files[n_eval:]]
  return ([train[i] for i in rng.permutation(len(train))],
          [evals[i] for i in rng.permutation(len(evals))])


def encode_example(path: str, label: int, class_name: str) -> bytes:
  """Returns the serialized tf.train.Example of one image file.

  Raises:
    UserError: the file does not decode as an image.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  with tf.io.gfile.GFile(path, 'rb') as f:
    data = f.read()
  try:
    if data[:3] == b'\xff\xd8\xff':  # JPEG, whatever the file extension says
      height, width = tf.io.decode_jpeg(data, channels=3).shape[:2]
    else:
      image = tf.io.decode_image(data, channels=3, expand_animations=False)
      height, width = image.shape[:2]
      # Full-resolution colour: 4:2:0 subsampling visibly blurs the colour
      # of small (CIFAR-size) images.
      data = tf.io.encode_jpeg(image, quality=95,
                               chroma_downsampling=False).numpy()
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
    raise UserError(f'image {path!r} does not decode ({errors.one_line(e)}); '
                    'delete or replace it, then run again') from e

  def feature(value):
    if isinstance(value, int):
      return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

  return tf.train.Example(features=tf.train.Features(feature={
      'image/encoded': feature(data),
      'image/format': feature(b'JPEG'),
      'image/class/label': feature(label),
      'image/class/text': feature(class_name.encode()),
      'image/filename': feature(os.path.basename(path).encode()),
      'image/height': feature(int(height)),
      'image/width': feature(int(width)),
  })).SerializeToString()


def convert(images_dir: str, output_dir: str, *, num_shards: int = 8,
            eval_fraction: float = 0.0, seed: int = 0,
            split_name: str = 'auto') -> dict[str, int]:
  """Writes the shards and labels.txt; returns {split: examples written}.

  Raises:
    UserError: bad flags or input (nothing is written then).
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  if num_shards < 1:
    raise UserError(f'flag --num_shards={num_shards} must be >= 1')
  if not 0.0 <= eval_fraction < 1.0:
    raise UserError(f'flag --eval_fraction={eval_fraction} must be in [0, 1), '
                    'e.g. 0.1 for a 10% eval split')
  if split_name not in SPLITS:
    raise UserError(f'flag --split={split_name!r} is unknown; valid: '
                    f'{", ".join(SPLITS)}')
  if split_name != 'auto' and eval_fraction:
    raise UserError(f'flag --eval_fraction={eval_fraction} splits one folder '
                    f'in two, but --split={split_name} writes every image to '
                    'one split; drop one of them')
  classes, paths = find_images(images_dir)
  labels_path = os.path.join(output_dir, 'labels.txt')
  if tf.io.gfile.isdir(output_dir):
    writing = ('train', 'eval') if split_name == 'auto' else (split_name,)
    old = sorted(f for f in tf.io.gfile.listdir(output_dir)
                 if SHARD_NAME.match(f) and f.split('-')[0] in writing)
    if old:
      raise UserError(f'flag --output={output_dir!r} already holds shards '
                      f'({old[0]}, ... {len(old)} files) that a file pattern '
                      'would mix with the new ones; pass a new directory or '
                      'delete them')
    if tf.io.gfile.exists(labels_path):
      with tf.io.gfile.GFile(labels_path) as f:
        listed = f.read().splitlines()
      if listed != classes:
        raise UserError(
            f'flag --images={images_dir!r} has classes {_few(classes)} but '
            f'{labels_path} lists {_few(listed)}: the labels of the two '
            'splits would not match; give both folders the same class '
            'folders, or pass a new --output')
  if split_name == 'auto':
    splits = dict(zip(('train', 'eval'),
                      split(paths, eval_fraction=eval_fraction, seed=seed)))
  else:
    splits = {split_name: split(paths, eval_fraction=0.0, seed=seed)[0]}
  # Shards are written under temporary names and renamed only once every
  # image has been encoded: a bad image leaves no partial set behind.
  tf.io.gfile.makedirs(output_dir)
  written = []
  try:
    for name, examples in splits.items():
      shards = min(num_shards, len(examples))
      for i, chunk in enumerate(np.array_split(np.arange(len(examples)),
                                               shards) if shards else []):
        path = os.path.join(output_dir, f'{name}-{i:05d}-of-{shards:05d}')
        written.append(path)
        with tf.io.TFRecordWriter(path + '.tmp') as writer:
          for j in chunk:
            image_path, label = examples[j]
            writer.write(encode_example(image_path, label, classes[label]))
  except BaseException:
    for path in written:
      if tf.io.gfile.exists(path + '.tmp'):
        tf.io.gfile.remove(path + '.tmp')
    raise
  for path in written:
    tf.io.gfile.rename(path + '.tmp', path, overwrite=True)
  with tf.io.gfile.GFile(labels_path, 'w') as f:
    f.write(''.join(f'{name}\n' for name in classes))
  return {name: len(examples) for name, examples in splits.items()}


def main(argv):
  del argv
  for name in ('images', 'output'):
    if not FLAGS[name].value:
      errors.fail(f'flag --{name} is required; usage: python -m '
               'input.make_tfrecords --images=DIR --output=OUT')
  try:
    counts = convert(FLAGS.images, FLAGS.output, num_shards=FLAGS.num_shards,
                     eval_fraction=FLAGS.eval_fraction, seed=FLAGS.seed,
                     split_name=FLAGS.split)
  except UserError as e:
    errors.fail(str(e))
  written = ' and '.join(f'{n} {name}' for name, n in counts.items())
  print(f'wrote {written} examples to {FLAGS.output} (labels.txt: class '
        'names, label = line number from 0)')


def _few(names):
  return ', '.join(names[:4]) + (f', ... ({len(names)})' if len(names) > 4
                                  else '')


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
