"""What checkpointing every 1,000 steps costs in training throughput.

  python bench/checkpoint_cost.py            # ~2 minutes on 2 CPU cores
  python bench/checkpoint_cost.py --quick    # smoke check, ~20 s

The seed MLP (100-64-64-10, Adam, batch 64, synthetic in-memory data) trains
through the Controller, three ways:

  none   no checkpoints;
  sync   a checkpoint every 1,000 steps, the loop waiting for the write;
  async  a checkpoint every 1,000 steps, written in the background (the
         default).

One model trains from one input stream. Each round runs one checkpoint
interval of 1,000 steps per way, in turn (rotating the order), each a
Controller.train() call: 1,000 - K steps up to the checkpoint boundary, the
save (or, for `none`, none), K more steps, and a wait for the write to be on
disk, as a run waits once at its end.

Whatever a save costs happens after the first 1,000 - K steps: its time on
the training thread (sync: the whole write; async: the copy to host memory),
the Controller's bookkeeping around it and, for async, the background write
competing with training for the cores, which the K steps after the save
span (the benchmark checks that every background write ended before the
final wait, or the wait charges the rest). Call the interval minus its first
loop of 1,000 - K steps the window; the cost of a way is

  median over rounds of (window of the way - window of none, same round)
  / median time of a whole 1,000-step interval of none.

A window lasts tens of milliseconds, so its machine noise is tens of times
smaller than that of a whole interval; the cost from whole intervals (the
median over rounds of the slow-down within a round) is printed beside it as
a cross-check, with its spread (interquartile range), as are the window's
parts.

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

from bench import harness
from configs import digits_mlp
from models import classifier
from trainer.persistence import checkpointing
from trainer.controller import Controller, ControllerOptions

flags.DEFINE_bool('quick', False, 'Smoke check: fewer rounds.')
flags.DEFINE_integer('rounds', 120, 'Timed rounds (one interval per way).',
                     lower_bound=1)
flags.DEFINE_integer('window_steps', 100, 'Steps after the save that the '
                     'window spans (K).', lower_bound=1)
FLAGS = flags.FLAGS

EVERY = 1000  # Steps between checkpoints.
WAYS = ('none', 'sync', 'async')
TARGET = 0.02


class _IntervalController(Controller):
  """Trains one checkpoint interval: 1,000 - K steps, save, K steps, wait.

  Reads on from one input stream across intervals (a new Controller would
  rebuild the input pipeline and skip the batches already used, which a real
  run does once, at a restart) and times the save, each inner loop and the
  final wait.
  """

  def __init__(self, *, iterator, window_steps, **kwargs):
    super().__init__(**kwargs)
    self._stream = iterator
    self._window_steps = window_steps
    self.times = {'save': 0.0, 'loops': [], 'wait': 0.0}

  def _iterator(self):
    return self._stream

  def _next_loop_length(self) -> int:
    step = self.step
    if step % EVERY == 0:
      return self._window_steps
    return min(EVERY - step % EVERY, self.total_steps - step)

  def _train_loop(self, iterator):
    metrics, seconds, untimed = super()._train_loop(iterator)
    self.times['loops'].append(seconds)
    return metrics, seconds, untimed

  def _save(self):
    # Only on the checkpoint boundary: the end-of-training save a run makes
    # is not part of the interval.
    if self.checkpointer and self.step % EVERY == 0:
      start = time.perf_counter()
      self.checkpointer.save()
      self.times['save'] = time.perf_counter() - start


class _TimedWait:
  """Wraps a Checkpointer to time its wait() (the end of the window)."""

  def __init__(self, checkpointer, times):
    self._checkpointer = checkpointer
    self._times = times

  def __getattr__(self, name):
    return getattr(self._checkpointer, name)

  def wait(self):
    start = time.perf_counter()
    self._checkpointer.wait()
    self._times['wait_start'] = start
    self._times['wait'] = time.perf_counter() - start


def build_ways(directory: str, window_steps: int):
  """Returns {way: run() -> (interval seconds, window seconds, write ended
  before the final wait)}, the global batch size and {way: [window parts]}.

  All ways train the same model from the same input stream: separate model
  instances in one process ran at speeds ~25 % apart with no checkpointing
  at all (memory layout, caches), which would swamp a cost of a few percent.
  """
  config = digits_mlp.get_config()
  config.data.name = 'synthetic'
  config.model.input_dim = 100
  tf.keras.utils.set_random_seed(0)
  trainer = classifier.ClassifierTrainer(config=config,
                                         strategy=tf.distribute.get_strategy())
  trainer.train(iter(trainer.distribute_dataset(
      'train', batch_size=trainer.global_batch_size)), window_steps)
  iterator = iter(trainer.distribute_dataset(
      'train', batch_size=trainer.global_batch_size))
  checkpointers = {
      way: checkpointing.Checkpointer(
          trainer, os.path.join(directory, way), max_to_keep=3,
          async_save=way == 'async') for way in WAYS if way != 'none'}
  write_ends = []  # perf_counter when each background write ended.
  parts = {way: [] for way in WAYS}

  def make_run(way):
    checkpointer = checkpointers.get(way)

    def run():
      start_step = int(trainer.global_step.numpy())
      assert start_step % EVERY == window_steps, start_step
      controller = _IntervalController(
          iterator=iterator, window_steps=window_steps, trainer=trainer,
          total_steps=start_step + EVERY, steps_per_loop=EVERY,
          checkpointer=None, options=ControllerOptions(
              checkpoint_every=EVERY if checkpointer else 0))
      if checkpointer:
        controller.checkpointer = _TimedWait(checkpointer, controller.times)
      writes = len(write_ends)
      start = time.perf_counter()
      controller.train()
      end = time.perf_counter()
      times = controller.times
      loops = times['loops']
      assert len(loops) == 2, loops  # Up to the boundary, then the window.
      window = end - start - loops[0]
      parts[way].append((times['save'], loops[1], times['wait'],
                         window - times['save'] - loops[1] - times['wait'],
                         loops[0]))
      inside = True
      if way == 'async':
        inside = (len(write_ends) > writes and
                  write_ends[-1] <= times['wait_start'])
      return end - start, window, inside
    return run

  runs = {way: make_run(way) for way in WAYS}
  writes = checkpointers['async']._writes  # pylint: disable=protected-access
  write = writes._write_and_call_back  # pylint: disable=protected-access

  def timed_write(*args, **kwargs):
    write(*args, **kwargs)
    write_ends.append(time.perf_counter())
  writes._write_and_call_back = timed_write  # pylint: disable=protected-access
  return runs, trainer.global_batch_size, parts


def _iqr(values) -> str:
  return harness.format_range(harness.iqr(values), '.1%', ' .. ')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  rounds = 8 if FLAGS.quick else FLAGS.rounds
  window_steps = FLAGS.window_steps
  with tempfile.TemporaryDirectory() as directory:
    runs, batch, parts = build_ways(directory, window_steps)
    for run in runs.values():
      for _ in range(3):
        run()  # Warm-up: tracing, the first (eager) and second (traced) save.
    for way in WAYS:
      parts[way].clear()
    intervals = {way: [] for way in WAYS}
    windows = {way: [] for way in WAYS}
    inside = []
    for _, way in harness.interleaved(WAYS, rounds):
      interval, window, ended = runs[way]()
      intervals[way].append(interval)
      windows[way].append(window)
      if way == 'async':
        inside.append(ended)
  base = statistics.median(intervals['none'])
  print(f'{rounds} rounds; a checkpoint every {EVERY} steps, a window of '
        f'{window_steps} steps after it; 1,000 steps without checkpoints '
        f'take {base * 1e3:.0f} ms ({EVERY * batch / base:,.0f} examples/sec)'
        '\n')
  print(f'{"way":8s} {"window ms":>10s} {"cost (windows)":>15s} '
        f'{"window IQR":>16s} {"cost (intervals)":>17s} '
        f'{"interval IQR":>16s}')
  cost = {}
  for way in WAYS:
    # Each round's ways run back to back: differences within a round
    # cancel the machine's slow drifts.
    extra = [(w - n) / base for w, n in zip(windows[way], windows['none'])]
    cost[way] = statistics.median(extra)
    paired = [t / n - 1 for t, n in zip(intervals[way], intervals['none'])]
    print(f'{way:8s} {statistics.median(windows[way]) * 1e3:10.2f} '
          f'{cost[way]:15.2%} {_iqr(extra):>16s} '
          f'{statistics.median(paired):17.2%} {_iqr(paired):>16s}')
  print(f'\n{"way":8s} {"save ms":>8s} {"K steps ms":>11s} {"wait ms":>8s} '
        f'{"other ms":>9s} {"first loop ms":>14s}  (medians of the window\'s '
        'parts, other: the Controller\'s own work; and of the first loop, '
        'outside the window)')
  for way in WAYS:
    save, loop, wait, other, first = (
        statistics.median(p) for p in zip(*parts[way]))
    print(f'{way:8s} {save * 1e3:8.2f} {loop * 1e3:11.2f} {wait * 1e3:8.2f} '
          f'{other * 1e3:9.2f} {first * 1e3:14.1f}')
  print(f'\nasync writes that ended before the final wait: {sum(inside)} of '
        f'{len(inside)} (the rest were charged up to their end by the wait)')
  verdict = 'meets' if cost['async'] < TARGET else 'MISSES'
  if not all(inside):
    print('WARNING: some async writes outlasted their window; the final wait '
          'charged them, but rerun with a larger --window_steps')
  print(f'async checkpoint every {EVERY} steps costs {cost["async"]:.2%}: '
        f'{verdict} the target < {TARGET:.0%} (sync: {cost["sync"]:.2%})')


if __name__ == '__main__':
  app.run(main)
