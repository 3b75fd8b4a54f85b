"""A generated image set: circles, crosses, squares and triangles.

  python -m input.shapes --output=/tmp/shapes --per_class=1000 [--size=32]

writes `OUTPUT/<class>/<index>.jpg`, the folder layout `input.make_tfrecords`
converts. Real JPEG files, made here rather than downloaded, so that the image
pipeline (decode, crop, flip, normalise), the conversion command and the
ResNet trainers can be tested and their learning measured on any machine,
offline, in seconds. Each image draws one filled shape with a random colour,
centre, size and rotation on a random background colour, plus Gaussian pixel
noise and JPEG artefacts: a network must learn shape, not colour or position
(chance is 1/4). Drawing uses numpy only; the JPEG encoder is TensorFlow's.

Images are a pure function of (--seed, class, index): rerunning the command
writes the same files.
"""

import os

from absl import app
from absl import flags
import numpy as np

from trainer import errors
from trainer.experiment import cli

CLASSES = ('circle', 'cross', 'square', 'triangle')  # sorted: label = index

FLAGS = flags.FLAGS


def define_flags():
  """The command's flags; defined only when run as a command, so that
  importing this module (tests, input.make_tfrecords) defines none."""
  flags.DEFINE_string('output', None, 'Directory to write <class>/*.jpg into.')
  flags.DEFINE_integer('per_class', 1000, 'Images per class.')
  flags.DEFINE_integer('size', 32, 'Height and width of the images, pixels.')
  flags.DEFINE_integer('seed', 0, 'The same seed writes the same images.')


def draw(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
  """Returns one uint8 [size, size, 3] image of `shape` (one of CLASSES)."""
  background = rng.uniform(0, 255, 3)
  foreground = rng.uniform(0, 255, 3)
  while np.abs(foreground - background).sum() < 150:  # keep it visible
    foreground = rng.uniform(0, 255, 3)
  radius = rng.uniform(0.22, 0.4) * size
  cy, cx = rng.uniform(radius, size - radius, 2)
  angle = rng.uniform(0, 2 * np.pi)
  y, x = np.mgrid[0:size, 0:size] + 0.5
  # Coordinates in the shape's rotated frame, in units of its radius.
  u = ((x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)) / radius
  v = (-(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)) / radius
  if shape == 'circle':
    mask = u**2 + v**2 <= 1
  elif shape == 'square':
    mask = (np.abs(u) <= 0.75) & (np.abs(v) <= 0.75)
  elif shape == 'cross':
    mask = (((np.abs(u) <= 0.25) & (np.abs(v) <= 1)) |
            ((np.abs(v) <= 0.25) & (np.abs(u) <= 1)))
  elif shape == 'triangle':
    # Inside all three edges of the triangle inscribed in the unit circle.
    mask = np.ones_like(u, dtype=bool)
    for k in range(3):
      theta = 2 * np.pi * k / 3
      mask &= u * np.cos(theta) + v * np.sin(theta) <= 0.5
  else:
    raise ValueError(f'shape {shape!r} is unknown; valid: {", ".join(CLASSES)}')
  image = np.where(mask[..., None], foreground, background)
  image = image + rng.normal(0, 12, image.shape)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def write(output: str, *, per_class: int, size: int = 32,
          seed: int = 0) -> int:
  """Writes per_class JPEGs of each class into output/<class>/; returns count."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  for label, shape in enumerate(CLASSES):
    folder = os.path.join(output, shape)
    tf.io.gfile.makedirs(folder)
    for index in range(per_class):
      rng = np.random.default_rng([seed, label, index])
      jpeg = tf.io.encode_jpeg(draw(shape, size, rng), quality=90)
      with tf.io.gfile.GFile(os.path.join(folder, f'{index:05d}.jpg'),
                             'wb') as f:
        f.write(jpeg.numpy())
  return per_class * len(CLASSES)


def main(argv):
  del argv
  if not FLAGS.output:
    errors.fail('flag --output is required: the directory to write '
          '<class>/*.jpg into, e.g. --output=/tmp/shapes')
  if FLAGS.per_class < 1:
    errors.fail(f'flag --per_class={FLAGS.per_class} must be >= 1')
  if FLAGS.size < 8:
    errors.fail(f'flag --size={FLAGS.size} must be >= 8 pixels')
  count = write(FLAGS.output, per_class=FLAGS.per_class, size=FLAGS.size,
                seed=FLAGS.seed)
  print(f'wrote {count} images ({len(CLASSES)} classes x {FLAGS.per_class}, '
        f'{FLAGS.size}x{FLAGS.size}) to {FLAGS.output}')


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
