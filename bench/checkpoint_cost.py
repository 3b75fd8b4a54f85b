"""What checkpointing every 1,000 steps costs in training throughput.

  python bench/checkpoint_cost.py            # ~1 minute on 2 CPU cores
  python bench/checkpoint_cost.py --quick    # smoke check, ~20 s

The seed MLP (100-64-64-10, Adam, batch 64, synthetic in-memory data) trains
through the Controller in inner loops of 1,000 steps, three ways:

  none   no checkpoints;
  async  a checkpoint every 1,000 steps, written in the background (default);
  sync   a checkpoint every 1,000 steps, the loop waiting for the write.

Each round times one segment of each way in turn (rotating the order, so
machine noise hits all alike); the throughput of a way is the median over
rounds of examples/sec, and the cost is 1 - median(way) / median(none).
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
flags.DEFINE_integer('rounds', 7, 'Timed rounds.')
flags.DEFINE_integer('loops_per_segment', 10, 'Inner loops of 1,000 steps '
                     'per timed segment.')
FLAGS = flags.FLAGS

STEPS_PER_LOOP = 1000
WAYS = ('none', 'async', 'sync')
TARGET = 0.02


def build_way(way: str, directory: str):
  """Returns run(num_loops) -> seconds, training through a Controller."""
  config = digits_mlp.get_config()
  config.data.name = 'synthetic'
  config.model.input_dim = 100
  tf.keras.utils.set_random_seed(0)
  trainer = classifier.ClassifierTrainer(config=config,
                                         strategy=tf.distribute.get_strategy())
  checkpointer = None
  if way != 'none':
    checkpointer = checkpointing.Checkpointer(
        trainer, os.path.join(directory, way), max_to_keep=3,
        async_save=way == 'async')
  state = {'total': 0}

  def run(num_loops: int) -> float:
    state['total'] += num_loops * STEPS_PER_LOOP
    controller = Controller(
        trainer=trainer, checkpointer=checkpointer, total_steps=state['total'],
        steps_per_loop=STEPS_PER_LOOP,
        options=ControllerOptions(
            checkpoint_every=STEPS_PER_LOOP if checkpointer else 0))
    start = time.perf_counter()
    controller.train()  # Ends with a wait for the last async write.
    return time.perf_counter() - start
  return run, trainer.global_batch_size


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  rounds = 3 if FLAGS.quick else FLAGS.rounds
  loops = 3 if FLAGS.quick else FLAGS.loops_per_segment
  with tempfile.TemporaryDirectory() as directory:
    ways = {way: build_way(way, directory) for way in WAYS}
    for run, _ in ways.values():
      run(1)  # Warm-up: tracing and the first (slow) save.
    rates = {way: [] for way in WAYS}
    for r in range(rounds):
      order = WAYS[r % len(WAYS):] + WAYS[:r % len(WAYS)]
      for way in order:
        run, batch = ways[way]
        seconds = run(loops)
        rates[way].append(loops * STEPS_PER_LOOP * batch / seconds)
  median = {way: statistics.median(v) for way, v in rates.items()}
  print(f'{"way":8s} {"examples/sec":>14s} {"cost vs none":>14s}')
  for way in WAYS:
    cost = 1 - median[way] / median['none']
    print(f'{way:8s} {median[way]:14,.0f} {cost:14.2%}')
  cost = 1 - median['async'] / median['none']
  verdict = 'meets' if cost < TARGET else 'MISSES'
  print(f'async checkpoint every {STEPS_PER_LOOP} steps costs {cost:.2%}: '
        f'{verdict} the target < {TARGET:.0%}')


if __name__ == '__main__':
  app.run(main)
