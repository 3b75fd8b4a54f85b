"""The best checkpoint so far by an eval metric, and early stopping.

Both outlive a restart: model_dir/best/record.json keeps the best value and
the steps of the evals since it, so a resumed run neither replaces the best
with a worse model nor counts its patience from zero, and a run that stopped
early stays stopped when the same command runs again.
"""

import json
import os

from absl import logging

from trainer.errors import UserError
from trainer.persistence import checkpointing
from trainer.persistence import run_record


# eval.best_mode=auto keeps the lowest of a metric whose name ends so.
LOWER_IS_BETTER = ('loss', 'error', 'mae', 'mse', 'rmse', 'perplexity',
                   'bits_per_byte', 'bits_per_char')


def checked_eval_keys(config_eval, metrics, trainer_name: str):
  """(best_metric, best_mode) of a resolved eval section, best_mode 'auto'
  made 'min' for a loss, an error, mae, mse, rmse or perplexity and 'max'
  otherwise (logged).

  Raises:
    UserError: no eval.split, or a best_metric the Trainer does not report.
  """
  if not config_eval.split:
    raise UserError(f'config key eval.split={config_eval.split!r} names no '
                    'split; every mode evaluates one at its end: name one of '
                    f"{trainer_name}'s splits, e.g. eval.split='test'")
  metric, mode = config_eval.best_metric, config_eval.best_mode
  if metric and metric not in metrics:
    raise UserError(f'config key eval.best_metric={metric!r} is not a '
                    f'metric of {trainer_name}; valid: {", ".join(metrics)} '
                    'or "" to keep no best checkpoint')
  if mode == 'auto':
    mode = 'min' if metric.endswith(LOWER_IS_BETTER) else 'max'
    if metric:
      logging.info('eval.best_mode=auto: the best checkpoint has the %s %s '
                   '(best_mode=%r; set eval.best_mode to choose)',
                   'lowest' if mode == 'min' else 'highest', metric, mode)
  return metric, mode


class BestCheckpoint:
  """Keeps model_dir/best: the checkpoint with the best `metric`.

  Args:
    directory: model_dir/best (a worker's own directory on the others).
    metric: the eval metric that picks it.
    mode: 'max' or 'min'.
    patience: stop after this many evals without a new best (0: never).
    read_from: where an earlier process's record is read (default
      `directory`): the job's model_dir/best on every worker, so that all
      take the same decisions.
  """

  def __init__(self, directory: str, *, metric: str, mode: str,
               patience: int = 0, read_from: str | None = None):
    self.directory, self.metric, self.mode = directory, metric, mode
    self.patience = patience
    self._read_from = read_from or directory
    self.value = None
    self.step = None  # Of the best.
    self.evals_since = []  # Steps of the evals since the best.
    self._loaded = False

  @property
  def _record_path(self) -> str:
    return os.path.join(self.directory, 'record.json')

  def _load(self, step: int) -> None:
    """Takes up the record an earlier process of this run left, once; of its
    evals since the best, those after `step` were lost with that process."""
    if self._loaded:
      return
    self._loaded = True
    path = os.path.join(self._read_from, 'record.json')
    try:
      with open(path, encoding='utf-8') as f:
        record = json.load(f)
      kept = (record['metric'], record['mode'])
      value, best_step = record['value'], record['step']
      if value is not None:  # None: no eval has been a best yet (NaN).
        value, best_step = float(value), int(best_step)
      since = [int(s) for s in record.get('evals_since', [])]
    except FileNotFoundError:
      return
    except (OSError, ValueError, KeyError, TypeError) as e:
      logging.warning('cannot read %s (%s); the next eval starts a new best',
                      path, e)
      return
    if kept != (self.metric, self.mode):
      logging.warning('%s keeps the best %s (%s); this run keeps the best %s '
                      '(%s): its next eval replaces it', self.directory,
                      *kept, self.metric, self.mode)
      return
    self.value, self.step = value, best_step
    self.evals_since = [s for s in since if s <= step]

  def stopped_early(self, step: int) -> bool:
    """True when an earlier process of this run, at or before `step` (the
    restored one), already ran out of patience."""
    self._load(step)
    if self.patience and len(self.evals_since) >= self.patience:
      logging.warning(
          'already stopped early at step %d: %s has not improved on %s for '
          '%d evals (eval.patience=%d); nothing to train', step, self.metric,
          self._best(), len(self.evals_since), self.patience)
      return True
    return False

  def track(self, trainer, step: int, metrics: dict) -> bool:
    """Saves a new best; returns True when patience ran out."""
    self._load(step - 1)
    # An eval of a step already counted (the final eval right after an early
    # stop, steps recomputed after a NaN rollback) counts once.
    self.evals_since = [s for s in self.evals_since if s < step]
    value = metrics[self.metric]
    if value != value:  # NaN: its weights summed to 0. Never a best.
      logging.warning('eval.best_metric=%s is NaN at step %d (its weights '
                      'summed to 0 over the split): not a best checkpoint; '
                      'best/ keeps %s', self.metric, step,
                      f'step {self.step}' if self.step is not None else
                      'none yet')
    better = value == value and (self.value is None or (
        value > self.value if self.mode == 'max' else value < self.value))
    if better:
      self.value, self.step, self.evals_since = value, step, []
      self._save(trainer, step)
      return False
    if self.step is not None and step <= self.step:
      # Recomputed after a restart from before the best: the run that found
      # it did not count these against it.
      return False
    self.evals_since.append(step)
    self._write_record()
    if self.patience and len(self.evals_since) >= self.patience:
      logging.warning('early stop at step %d: %s has not improved on %s for '
                      '%d evals (eval.patience)', step, self.metric,
                      self._best(), len(self.evals_since))
      return True
    return False

  def _best(self) -> str:
    if self.value is None:  # Every eval's value was NaN.
      return 'NaN (no evaluation has had a value)'
    return f'{self.value:.6g} (step {self.step})'

  def _save(self, trainer, step: int) -> None:
    """Writes best/ckpt-<step>, then record.json (atomically), then removes
    the previous best: the record never names a deleted checkpoint."""
    manager = checkpointing.Checkpointer(trainer, self.directory,
                                         max_to_keep=2, async_save=False)
    manager.save()
    self._write_record()
    for old in checkpointing.checkpoint_paths(self.directory):
      if os.path.basename(old) != f'ckpt-{step}':
        checkpointing.remove(old)

  def _write_record(self) -> None:
    os.makedirs(self.directory, exist_ok=True)  # Before a first save here.
    run_record.write_json_atomically(self._record_path, {
        'metric': self.metric, 'mode': self.mode, 'value': self.value,
        'step': self.step,
        'checkpoint': None if self.step is None else f'ckpt-{self.step}',
        'evals_since': self.evals_since})
