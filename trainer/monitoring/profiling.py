"""--profile_steps=START,END: a profiler trace of those training steps.

The trace goes to `model_dir/train/plugins/profile/<session>/`, where
TensorBoard's profile plugin (`pip install tensorboard-plugin-profile`) shows
it under the run `train`. Inside the window the controller runs inner loops
of one step each, every one inside
`tf.profiler.experimental.Trace('train', step_num=step, _r=1)`: `_r=1` marks
the event as a step, so the trace viewer and the overview page show step
boundaries. (A whole inner loop is one `tf.function` call; without one-step
loops a custom loop's profile has no steps: tensorboard#4945.)
"""

import contextlib
import dataclasses
import os

from absl import logging
import tensorflow as tf



@dataclasses.dataclass
class ProfileWindow:
  """Traces steps start..end (1-based: step n takes global_step n-1 to n).

  Args:
    start, end: first and last step to trace, inclusive.
    logdir: the run directory the trace goes under (model_dir/train).
  """
  start: int
  end: int
  logdir: str
  _active: bool = False
  done: bool = False

  def check_start(self, step: int, total_steps: int) -> None:
    """Warns when a run from global_step `step` to `total_steps` does not
    reach the window."""
    if step >= self.end:
      logging.warning('--profile_steps=%d,%d: the run starts at step %d, '
                      'after them; nothing is profiled', self.start, self.end,
                      step)
    elif self.start > total_steps:
      logging.warning('--profile_steps=%d,%d: the run ends at step %d '
                      '(train.steps), before them; nothing is profiled',
                      self.start, self.end, total_steps)

  def loop_length(self, step: int, length: int) -> int:
    """`length` cut so a loop starting at global_step `step` ends before the
    window, or runs exactly one step inside it."""
    if self.done or step >= self.end:
      return length
    if step >= self.start - 1:
      return 1
    return min(length, self.start - 1 - step)

  def covers(self, step: int) -> bool:
    """Whether the inner loop starting at global_step `step` is traced."""
    return not self.done and self.start - 1 <= step < self.end

  @contextlib.contextmanager
  def step(self, step: int):
    """Context for the inner loop that starts at global_step `step`."""
    if not self.covers(step):
      yield
      return
    if not self._active:
      logging.info('profiling steps %d-%d into %s', max(step + 1, self.start),
                   self.end, self.logdir)
      tf.profiler.experimental.start(self.logdir)
      self._active = True
    with tf.profiler.experimental.Trace('train', step_num=step + 1, _r=1):
      yield
    if step + 1 >= self.end:
      self.stop()

  def stop(self) -> None:
    """Ends the trace and writes it (also when training stops early)."""
    if self._active:
      tf.profiler.experimental.stop()
      self._active = False
      logging.info('profile written to %s',
                   os.path.join(self.logdir, 'plugins', 'profile'))
    self.done = True
