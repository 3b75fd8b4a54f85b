"""What checkpointing every 1,000 steps costs in training throughput.

  python bench/checkpoint_cost.py            # ~2 minutes on 2 CPU cores
  python bench/checkpoint_cost.py --quick    # smoke check, ~20 s

The seed MLP (100-64-64-10, Adam, batch 64, synthetic in-memory data) trains
through the Controller in inner loops of 1,000 steps, three ways:

  none   no checkpoints;
  sync   a checkpoint every 1,000 steps, the loop waiting for the write;
  async  a checkpoint every 1,000 steps, written in the background (the
         default).

One model trains from one input stream in segments of --loops_per_segment
inner loops, each segment a Controller.train() call with the way's
checkpointer (ending with a wait for the last write, as a run does once at
its end). Each round times one segment of each way in turn (rotating the
order, so machine noise hits all alike). The cost of a way is the median over rounds of
1 - examples/sec(way) / examples/sec(none) within the round (paired: the
segments of a round run back to back, so slow drifts of the machine cancel);
the cost from the median throughputs and the spread (interquartile range) of
the paired costs are printed too.
Target: async costs < 2%.
"""

import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

# pylint: disable=wrong-import-position
from absl import app
from absl import flags
from absl import logging
import tensorflow as tf

from configs import digits_mlp
from models import classifier
from trainer import checkpointing
from trainer.controller import Controller, ControllerOptions

flags.DEFINE_bool('quick', False, 'Smoke check: fewer, shorter rounds.')
flags.DEFINE_integer('rounds', 40, 'Timed rounds.')
flags.DEFINE_integer('loops_per_segment', 2, 'Inner loops of 1,000 steps '
                     'per timed segment.')
FLAGS = flags.FLAGS

STEPS_PER_LOOP = 1000
WAYS = ('none', 'sync', 'async')
TARGET = 0.02


class _SegmentController(Controller):
  """A Controller that reads on from one input stream across segments.

  A new Controller would rebuild the input pipeline and skip the batches
  already used, which a real run does once, at a restart.
  """

  def __init__(self, *, iterator, **kwargs):
    super().__init__(**kwargs)
    self._stream = iterator

  def _iterator(self):
    return self._stream


def build_ways(directory: str):
  """Returns ({way: run(num_loops) -> seconds}, global batch size).

  All ways train the same model from the same input stream, one segment
  after another: separate model instances in one process ran at speeds
  ~25 % apart with no checkpointing at all (memory layout, caches), which
  would swamp a cost of a few percent.
  """
  config = digits_mlp.get_config()
  config.data.name = 'synthetic'
  config.model.input_dim = 100
  tf.keras.utils.set_random_seed(0)
  trainer = classifier.ClassifierTrainer(config=config,
                                         strategy=tf.distribute.get_strategy())
  iterator = iter(trainer.distribute_dataset(
      'train', batch_size=trainer.global_batch_size))
  checkpointers = {
      way: checkpointing.Checkpointer(
          trainer, os.path.join(directory, way), max_to_keep=3,
          async_save=way == 'async') for way in WAYS if way != 'none'}

  def make_run(checkpointer):
    def run(num_loops: int) -> float:
      controller = _SegmentController(
          iterator=iterator, trainer=trainer, checkpointer=checkpointer,
          total_steps=int(trainer.global_step.numpy()) +
          num_loops * STEPS_PER_LOOP,
          steps_per_loop=STEPS_PER_LOOP,
          options=ControllerOptions(
              checkpoint_every=STEPS_PER_LOOP if checkpointer else 0))
      start = time.perf_counter()
      controller.train()  # Ends with a wait for the last async write.
      return time.perf_counter() - start
    return run
  runs = {way: make_run(checkpointers.get(way)) for way in WAYS}
  return runs, trainer.global_batch_size


def _quartiles(values):
  q = statistics.quantiles(values, n=4)
  return q[0], q[2]


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  rounds = 3 if FLAGS.quick else FLAGS.rounds
  loops = 2 if FLAGS.quick else FLAGS.loops_per_segment
  with tempfile.TemporaryDirectory() as directory:
    runs, batch = build_ways(directory)
    for run in runs.values():
      run(2)  # Warm-up: tracing, the first (eager) and second (traced) save.
    rates = {way: [] for way in WAYS}
    for r in range(rounds):
      order = WAYS[r % len(WAYS):] + WAYS[:r % len(WAYS)]
      for way in order:
        seconds = runs[way](loops)
        rates[way].append(loops * STEPS_PER_LOOP * batch / seconds)
  median = {way: statistics.median(v) for way, v in rates.items()}
  print(f'{rounds} rounds of {loops} x {STEPS_PER_LOOP} steps per way\n')
  print(f'{"way":8s} {"examples/sec":>14s} {"cost (medians)":>15s} '
        f'{"cost (paired)":>14s} {"paired IQR":>16s}')
  paired = {}
  for way in WAYS:
    # Each round's segments run back to back: the ratio within a round
    # cancels the machine's slow drifts, which the ratio of medians does not.
    costs = [1 - w / n for w, n in zip(rates[way], rates['none'])]
    paired[way] = statistics.median(costs)
    low, high = _quartiles(costs) if len(costs) > 1 else (costs[0],) * 2
    print(f'{way:8s} {median[way]:14,.0f} '
          f'{1 - median[way] / median["none"]:15.2%} {paired[way]:14.2%} '
          f'{f"{low:.1%} .. {high:.1%}":>16s}')
  cost = paired['async']
  verdict = 'meets' if cost < TARGET else 'MISSES'
  print(f'\nasync checkpoint every {STEPS_PER_LOOP} steps costs {cost:.2%} '
        f'(median of paired rounds): {verdict} the target < {TARGET:.0%}')


if __name__ == '__main__':
  app.run(main)
