"""The best checkpoint so far by an eval metric, and early stopping."""

import os

from absl import logging

from trainer.persistence import checkpointing
from trainer.persistence import run_record


class BestCheckpoint:
  """Keeps model_dir/best: the checkpoint with the best `metric`.

  Args:
    directory: model_dir/best.
    metric: the eval metric that picks it.
    mode: 'max' or 'min'.
    patience: stop after this many evals without a new best (0: never).
  """

  def __init__(self, directory: str, *, metric: str, mode: str,
               patience: int = 0):
    self.directory, self.metric, self.mode = directory, metric, mode
    self.patience = patience
    self.value = None
    self.evals_since = 0

  def track(self, trainer, step: int, metrics: dict) -> bool:
    """Saves a new best; returns True when patience ran out."""
    value = metrics[self.metric]
    better = (self.value is None or
              (value > self.value if self.mode == 'max' else value < self.value))
    if better:
      self.value, self.evals_since = value, 0
      self._save(trainer, step, value)
      return False
    self.evals_since += 1
    if self.patience and self.evals_since >= self.patience:
      logging.warning('early stop at step %d: %s has not improved on %.6g for '
                      '%d evals (eval.patience)', step, self.metric,
                      self.value, self.evals_since)
      return True
    return False

  def _save(self, trainer, step: int, value: float) -> None:
    """Writes best/ckpt-<step> then best/record.json (atomically, after)."""
    manager = checkpointing.Checkpointer(trainer, self.directory,
                                         max_to_keep=1, async_save=False)
    path = manager.save()
    run_record.write_json_atomically(
        os.path.join(self.directory, 'record.json'),
        {'metric': self.metric, 'mode': self.mode, 'value': value,
         'step': step, 'checkpoint': os.path.basename(path)})
