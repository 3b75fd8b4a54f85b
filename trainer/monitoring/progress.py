"""What a run is doing, on the host: interval means, throughput, console ETA.

`Meter` adds up the results of inner loops (`Trainer.train`) between two
reports and turns them into the numbers a summary or a log line shows.
`ProgressLogger` decides when to print a progress line (every inner loop, or
at most one per `log.every_secs`) and estimates the time left. Both take time
as numbers passed in (the Controller's injected clock), so tests are exact.
"""

import datetime

from absl import logging


class Meter:
  """Accumulates inner-loop results until `reset`.

  Loss and metrics are means over all examples of the interval (weighted
  means for weighted values: each loop's mean weighs by its weight sum);
  grad_norm is the mean over its applied steps. Throughput counts only timed
  loops: a loop that traced the tf.function spent its time mostly building
  the graph, and one under the profiler pays for the tracing, so neither
  says how fast training goes (their metrics still count). The input-wait share comes from the
  loops that measured it (Trainer.train(measure_input_wait=True), one inner
  loop in several): their in-graph wait over their in-graph loop time, so
  it is exact even for a loop that traced; absent when no loop of the
  interval measured it.

  Args:
    global_batch_size: examples per step, for examples_per_sec.
    metric_names: the metrics (besides 'loss') to average.
  """

  def __init__(self, global_batch_size: int, metric_names=()):
    self.global_batch_size = global_batch_size
    self.metric_names = tuple(metric_names)
    self.reset()

  def reset(self) -> None:
    self._examples = 0.0
    self._sums = {}
    self._steps = 0
    self._grad_norm_sum, self._grad_norm_steps = 0.0, 0
    self._timed_steps, self._timed_secs = 0, 0.0
    self._waited_secs, self._wait_window_secs = 0.0, 0.0

  def add(self, result: dict, seconds: float, untimed: bool = False) -> None:
    """Adds one `Trainer.train` result that took `seconds` of wall time;
    an `untimed` one (it traced, or ran under the profiler) counts for the
    metrics but not for throughput."""
    examples = result['examples']
    self._examples += examples
    weights = result.get('weights', {})
    for name in ('loss', *self.metric_names):
      weight = weights.get(name, examples)
      total, weight_sum = self._sums.get(name, (0.0, 0.0))
      if weight:  # Else its mean is NaN, and adds nothing.
        total, weight_sum = total + result[name] * weight, weight_sum + weight
      self._sums[name] = (total, weight_sum)
    steps = result['steps']
    self._steps += steps
    if 'grad_norm' in result:
      self._grad_norm_sum += result['grad_norm'] * steps
      self._grad_norm_steps += steps
    if not untimed:
      self._timed_steps += steps
      self._timed_secs += seconds
    if 'input_wait_secs' in result:
      self._waited_secs += result['input_wait_secs']
      self._wait_window_secs += result['loop_secs']

  @property
  def steps(self) -> int:
    return self._steps

  def result(self) -> dict[str, float]:
    """{'loss', metrics..., 'grad_norm', 'examples_per_sec', 'steps_per_sec',
    'input_wait_share'}; the rates without data in the interval are left
    out."""
    # A metric whose weights summed to 0 is NaN, as in an evaluation.
    out = {k: total / weight if weight else float('nan')
           for k, (total, weight) in self._sums.items()}
    if self._grad_norm_steps:
      out['grad_norm'] = self._grad_norm_sum / self._grad_norm_steps
    if self._timed_steps and self._timed_secs > 0:
      out['steps_per_sec'] = self._timed_steps / self._timed_secs
      out['examples_per_sec'] = out['steps_per_sec'] * self.global_batch_size
    if self._wait_window_secs > 0:
      out['input_wait_share'] = min(
          1.0, self._waited_secs / self._wait_window_secs)
    return out


class ProgressLogger:
  """One absl line per inner loop, or at most one per `every_secs`.

    step 1200/3000: loss=0.0166 accuracy=0.9981 examples/sec=190,321
    input_wait=4% ETA 0:00:01

  (one line). The first inner loop of a process and the last one always
  log, so a short run shows its start and end and a long one stays quiet.
  The ETA is the time left at the average pace since the end of the first
  inner loop (which includes tracing), checkpoints and evaluation included.

  Args:
    total_steps: the step training ends at.
    global_batch_size: examples per step.
    main_metric: the metric shown after the loss ('' for none).
    every_secs: minimum seconds between lines; 0 logs every inner loop.
  """

  def __init__(self, *, total_steps: int, global_batch_size: int,
               main_metric: str = '', every_secs: float = 0.0):
    self.total_steps = total_steps
    self.main_metric = main_metric
    self.every_secs = every_secs
    self.meter = Meter(global_batch_size,
                       (main_metric,) if main_metric else ())
    self._last_line = None  # Time of the last line.
    self._pace_start = None  # (time, step) after the first inner loop.
    # The input wait is measured on one inner loop in several: a line shows
    # the latest measurement.
    self._wait_share = None

  def loop_done(self, step: int, result: dict, seconds: float, now: float,
                untimed: bool = False) -> str | None:
    """Records an inner loop that ended at `step`, `now`; returns the line
    logged, or None. `result`, `seconds`, `untimed`: as for Meter.add."""
    self.meter.add(result, seconds, untimed)
    first = self._pace_start is None
    if first:
      self._pace_start = (now, step)
    due = (first or step >= self.total_steps or not self.every_secs or
           now - self._last_line >= self.every_secs)
    if not due:
      return None
    line = self.line(step, now)
    logging.info('%s', line)
    self._last_line = now
    self.meter.reset()
    return line

  def eta_secs(self, step: int, now: float) -> float | None:
    start_time, start_step = self._pace_start or (now, step)
    if step <= start_step or now <= start_time:
      return None
    pace = (now - start_time) / (step - start_step)
    return max(0, self.total_steps - step) * pace

  def line(self, step: int, now: float) -> str:
    values = self.meter.result()
    parts = [f'step {step}/{self.total_steps}:']
    for name in ('loss', self.main_metric):
      if name in values:
        parts.append(f'{name}={values[name]:.4g}')
    if 'examples_per_sec' in values:
      parts.append(f'examples/sec={values["examples_per_sec"]:,.0f}')
    self._wait_share = values.get('input_wait_share', self._wait_share)
    if self._wait_share is not None:
      parts.append(f'input_wait={self._wait_share:.0%}')
    eta = self.eta_secs(step, now)
    if step >= self.total_steps:
      parts.append('done')
    elif eta is not None:
      parts.append(f'ETA {format_duration(eta)}')
    return ' '.join(parts)


def format_duration(seconds: float) -> str:
  """'0:00:07', '1 day, 2:03:04'."""
  return str(datetime.timedelta(seconds=round(seconds)))


def format_metrics(metrics: dict[str, float]) -> str:
  """'accuracy=0.973 loss=0.091': sorted key=value pairs, counts as ints."""
  parts = []
  for key in sorted(metrics):
    value = metrics[key]
    if key in ('examples', 'steps'):
      parts.append(f'{key}={int(value)}')
    elif key.endswith('_per_sec'):
      parts.append(f'{key}={value:.0f}')
    else:
      parts.append(f'{key}={value:.4g}')
  return ' '.join(parts)
