"""Images/sec of the ImageNet-format JPEG pipeline, read here or through a
tf.data service.

  python bench/data_service.py            # ~4 minutes on 2 CPU cores
  python bench/data_service.py --quick    # smoke check, ~1 minute

The training pipeline of configs/imagenet_resnet50.py (input/imagenet.py:
TFRecords of JPEGs, interleaved reads, shuffle, random resized crop and
flip, normalisation, batches of 64 at 224x224) over generated shape images
(input/shapes.py, 256x256 JPEGs) is read two ways:

  local    in this process, as a trainer without data.service reads it;
  service  through `python -m input.data_service --workers=2` started as a
           separate process on this machine, as a trainer with
           data.service reads it (one job, distributed_epoch).

Each is built and read until warm (files cached, autotuning settled); then
every round times a segment of batches of each way, the order rotating;
images/sec is the median over rounds, the spread the min-max. While the
local pipeline is read the service process is paused (SIGSTOP), so that it
does not take the cores; it is resumed (SIGCONT) for its own segments.
Before each segment, untimed, the way about to be timed is read until the
batches its buffers filled while the other way ran are used up: a segment
times production, not a buffer.

What it measures on a single machine: the cost of moving batches through
the service (serialising 38 MB batches over loopback gRPC) against the
same cores decoding. The service's gain needs other machines: its workers
then add their cores to the trainer host's, which this machine cannot show.
"""

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=wrong-import-position
from absl import app
from absl import flags
import tensorflow as tf

from bench import harness
from input import imagenet
from input import make_tfrecords
from input import shapes

FLAGS = flags.FLAGS
flags.DEFINE_bool('quick', False, 'few small rounds: a smoke check')
flags.DEFINE_integer('rounds', 7, 'timed rounds', lower_bound=1)
flags.DEFINE_float('segment_secs', 4.0, 'seconds per timed segment')
flags.register_validator('segment_secs', lambda secs: secs > 0, 'must be > 0')

BATCH = 64
IMAGE_SIZE = 224
WAYS = ('local', 'service')
# More than either way's buffers hold (prefetch, the service's workers and
# its client's outstanding requests).
DRAIN_BATCHES = 24


def make_records(root: str, per_class: int) -> str:
  shapes.write(os.path.join(root, 'images'), per_class=per_class, size=256)
  make_tfrecords.convert(os.path.join(root, 'images'),
                         os.path.join(root, 'records'), num_shards=8)
  return os.path.join(root, 'records', 'train-*')


def start_service() -> tuple[subprocess.Popen, str]:
  log = tempfile.TemporaryFile(mode='w+')
  process = subprocess.Popen(
      [sys.executable, '-m', 'input.data_service', '--port=0',
       '--workers=2'], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
      text=True)
  deadline = time.monotonic() + 120
  while True:
    log.seek(0)
    found = re.search(r'dispatcher (grpc://\S+),', log.read())
    if found:
      return process, found.group(1)
    if process.poll() is not None or time.monotonic() > deadline:
      log.seek(0)
      raise RuntimeError(f'the tf.data service did not start:\n{log.read()}')
    time.sleep(0.2)


def pipeline(pattern: str) -> tf.data.Dataset:
  return imagenet.dataset(
      'train', input_context=tf.distribute.InputContext(), batch_size=BATCH,
      training=True, seed=0, file_pattern=pattern, image_size=IMAGE_SIZE,
      shuffle_buffer=256)


def main(argv):
  del argv
  rounds = 3 if FLAGS.quick else FLAGS.rounds
  segment_secs = 1.0 if FLAGS.quick else FLAGS.segment_secs
  service, address = start_service()
  try:
    with tempfile.TemporaryDirectory() as root:
      pattern = make_records(root, per_class=50 if FLAGS.quick else 250)
      iterators = {
          'local': iter(pipeline(pattern)),
          'service': iter(pipeline(pattern).apply(
              tf.data.experimental.service.distribute(
                  tf.data.experimental.service.ShardingPolicy.DYNAMIC,
                  address, job_name='bench'))),
      }

      def read(way, batches):
        for _ in range(batches):
          next(iterators[way])

      def switch_to(way):
        """Pauses the other way and empties this one's buffers: the
        batches its prefetching made while the other was timed."""
        service.send_signal(signal.SIGCONT if way == 'service' else
                            signal.SIGSTOP)
        read(way, DRAIN_BATCHES)

      batches = {}
      for way in WAYS:
        switch_to(way)
        read(way, 10 if FLAGS.quick else 40)  # Warm-up.
        batches[way] = harness.calibrate(lambda n, w=way: read(w, n),
                                         segment_secs, probe_calls=5)
      samples = {way: [] for way in WAYS}
      for _, way in harness.interleaved(WAYS, rounds):
        switch_to(way)
        _, seconds = harness.timed(read, way, batches[way])
        samples[way].append(batches[way] * BATCH / seconds)
  finally:
    service.send_signal(signal.SIGCONT)
    service.send_signal(signal.SIGTERM)
    service.wait(timeout=60)
  values = harness.medians(samples)
  rows = [('way', 'images/sec', 'min-max', 'ratio to local')]
  for way in WAYS:
    rows.append((way, f'{values[way]:.0f}',
                 harness.format_range(harness.min_max(samples[way]), '.0f'),
                 harness.format_ratio(harness.ratio(values, way, 'local'),
                                      '.2f')))
  print(f'JPEG pipeline, batch {BATCH} at {IMAGE_SIZE}x{IMAGE_SIZE}, '
        f'{rounds} rounds, {os.cpu_count()} CPU cores')
  harness.print_table(rows, (10, 12, 14, 16))


if __name__ == '__main__':
  app.run(main)
