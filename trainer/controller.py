"""The outer loop: runs inner loops of `steps_per_loop` steps and logs them.

Host work (logging, and later checkpoints, summaries and eval) happens only
between inner loops, never inside the tf.function.
"""

import time

from absl import logging


class Controller:
  """Drives a Trainer from the host.

  Args (keyword-only):
    trainer: a built Trainer.
    total_steps: train until trainer.global_step reaches this.
    steps_per_loop: steps per tf.function call; the last loop may be shorter.
    clock: returns seconds; injected so tests control time.
  """

  def __init__(self, *, trainer, total_steps: int, steps_per_loop: int,
               clock=time.monotonic):
    self.trainer = trainer
    self.total_steps = total_steps
    self.steps_per_loop = steps_per_loop
    self.clock = clock
    self.history = []

  def train(self) -> dict[str, float]:
    """Trains to total_steps; returns the last inner loop's metrics."""
    trainer = self.trainer
    step = int(trainer.global_step.numpy())
    if step >= self.total_steps:
      logging.info('step %d >= train.steps=%d: nothing to train', step,
                   self.total_steps)
      return {}
    dataset = trainer.distribute_dataset('train',
                                         batch_size=trainer.global_batch_size)
    iterator = iter(dataset)
    metrics = {}
    while step < self.total_steps:
      num_steps = min(self.steps_per_loop, self.total_steps - step)
      start = self.clock()
      metrics = trainer.train(iterator, num_steps)
      seconds = max(self.clock() - start, 1e-9)
      step = int(trainer.global_step.numpy())
      metrics['examples_per_sec'] = metrics['examples'] / seconds
      self.history.append((step, metrics))
      logging.info('step %d/%d: %s', step, self.total_steps,
                   format_metrics(metrics))
    return metrics

  def evaluate(self, split: str = 'test') -> dict[str, float]:
    metrics = self.trainer.evaluate(split)
    logging.info('eval %s at step %d: %s', split,
                 int(self.trainer.global_step.numpy()), format_metrics(metrics))
    return metrics


def format_metrics(metrics: dict[str, float]) -> str:
  """'accuracy=0.973 loss=0.091': sorted key=value pairs, counts as ints."""
  parts = []
  for key in sorted(metrics):
    value = metrics[key]
    if key == 'examples':
      parts.append(f'{key}={int(value)}')
    elif key.endswith('_per_sec'):
      parts.append(f'{key}={value:.0f}')
    else:
      parts.append(f'{key}={value:.4g}')
  return ' '.join(parts)
