"""Host actions: your work between inner loops, at a cadence.

  Action(fn, every_steps=1000)    every 1,000 steps (inner loops are cut to
                                  end on those steps, as for summaries)
  Action(fn, after_eval=True)     after each evaluation, with its metrics
  Action(fn, at_end=True)         when training ends
  Action(fn, on_preemption=True)  before a SIGTERM or Ctrl-C exit (after the save)

`fn(context)` runs on the host, eagerly, never inside a tf.function; the
context holds the step, the Trainer, the eval metrics (after an eval) and a
summary writer for images, text and histograms (trainer/monitoring/
summaries.py). Actions run on the chief of a multi-worker run only, unless
made with `everywhere=True` (then they run on every worker, at the same
step: an action that calls into the strategy must). A Trainer declares its
actions in `actions()`; the config adds built-in ones (summary.
histograms_every_steps). An action that raises stops the run with one line
naming it (exit 2); a checkpoint in flight still completes. An action's
`trainer.evaluate()` during training is stopped by a SIGTERM or Ctrl-C as a
periodic evaluation is (preemption.EvalStopped): the action ends there and
the run saves and exits.
"""

import dataclasses
from typing import Any, Callable

from absl import logging
import tensorflow as tf

from trainer import errors
from trainer.errors import UserError
from trainer.persistence import preemption


@dataclasses.dataclass
class Context:
  """What an action sees.

  Attributes:
    step: the global step.
    trainer: the Trainer (its model, strategy, config...).
    event: 'steps', 'eval', 'end' or 'preemption'.
    writer: a summaries.MetricWriter: the run's train directory, or its
      eval directory for 'eval' (a NullWriter off the chief).
    metrics: the evaluation's metrics for 'eval', else None.
    model_dir: where the run writes (None: nowhere).
  """
  step: int
  trainer: Any
  event: str
  writer: Any
  metrics: dict | None = None
  model_dir: str | None = None


@dataclasses.dataclass
class Action:
  """`fn(context)` at the cadences set (module docstring)."""
  fn: Callable[[Context], None]
  every_steps: int = 0
  after_eval: bool = False
  at_end: bool = False
  on_preemption: bool = False
  everywhere: bool = False
  name: str = ''

  def __post_init__(self):
    self.name = self.name or getattr(self.fn, '__name__', 'action')
    if (isinstance(self.every_steps, bool) or
        not isinstance(self.every_steps, int) or self.every_steps < 0):
      raise UserError(f'action {self.name!r}: every_steps={self.every_steps!r}'
                      ' must be an integer >= 0 (0: not by steps)')
    if not (self.every_steps or self.after_eval or self.at_end or
            self.on_preemption):
      raise UserError(f'action {self.name!r} has no cadence: set every_steps, '
                      'after_eval, at_end or on_preemption')

  def due(self, event: str, step: int) -> bool:
    if event == 'steps':
      return bool(self.every_steps) and step % self.every_steps == 0
    return {'eval': self.after_eval, 'end': self.at_end,
            'preemption': self.on_preemption}[event]


class Actions:
  """The actions of one run; runs those due at an event.

  Args:
    actions: the Action list.
    is_chief: whether this process is the chief (others run only
      `everywhere` actions).
  """

  def __init__(self, actions, *, is_chief: bool = True):
    self.actions = [a for a in actions if is_chief or a.everywhere]
    names = [a.name for a in self.actions]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
      raise UserError(f'actions named {", ".join(dupes)} twice: give each '
                      'Action a name of its own (name=...)')

  @property
  def cadences(self) -> list[int]:
    """The every_steps of the actions: inner loops end on their steps."""
    return [a.every_steps for a in self.actions if a.every_steps]

  def run(self, event: str, context: Context) -> None:
    """Runs every action due at `event` (context.step), in order.

    Raises:
      UserError: an action raised; the line names it and keeps its message.
    """
    for action in self.actions:
      if not action.due(event, context.step):
        continue
      try:
        action.fn(context)
      except preemption.EvalStopped:
        # Its trainer.evaluate() met a SIGTERM or Ctrl-C: the run saves and
        # exits next, as it does after a periodic evaluation stopped so.
        logging.warning('action %r (%s at step %d): its evaluation was '
                        'stopped by the stop request', action.name, event,
                        context.step)
      except Exception as e:  # pylint: disable=broad-except
        raise UserError(f'action {action.name!r} ({event} at step '
                        f'{context.step}) raised {type(e).__name__}: '
                        f'{errors.one_line(e)}') from e


def weight_histograms(context: Context) -> None:
  """Writes a histogram of every trainable weight (summary.
  histograms_every_steps): TensorBoard's Histograms and Distributions tabs,
  under weights/<path>."""
  model = context.trainer.model
  context.writer.write_histograms(context.step, {
      'weights/' + getattr(v, 'path', v.name): tf.convert_to_tensor(v).numpy()
      for v in model.trainable_variables})  # A weight in pieces: joined.


def built_in(config) -> list[Action]:
  """The actions the config asks for."""
  every = config.summary.histograms_every_steps
  return [Action(weight_histograms, every_steps=every,
                 name='weight_histograms')] if every else []
