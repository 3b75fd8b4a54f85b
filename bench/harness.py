"""The measurement method every benchmark in bench/ shares.

A benchmark says what it compares (methods, workloads, setups) and how to
time one of them once; this module holds the method around that:

  1. Warm-up (`warm_up`): build each method and call it untimed until the
     one-off costs are paid (tracing, XLA compilation, a first save, files
     read from disk), which a real run pays once. A method that cannot run
     here (e.g. Keras fit under MirroredStrategy, keras#19246) is reported,
     not timed.
  2. Calibration (`calibrate`): how many calls make one timed segment of
     about the same length for every method.
  3. Interleaved rounds (`interleaved`): each round times one segment of
     every method, in an order that changes from round to round (`rotated`,
     or `back_and_forth`), so machine noise and a load that drifts during
     the run hit every method alike. Where the order the methods were built
     in matters too, several processes build them in turn (`build_order`)
     and their rounds are pooled (`pooled`).
  4. Summary: a method's value is the median over rounds (`medians`), its
     spread the min-max or the interquartile range (`min_max`, `iqr`,
     `format_range`); methods compare by ratios of medians (`ratio`) or
     within each round (`paired_ratios`, `median_paired_ratio`), printed by
     `format_ratio` and `print_table`.

What is not here stays with each benchmark because it differs between
them: what one call does and returns, and the check that the methods did
the same work (e.g. the same mean loss over the first steps) before a
ratio is trusted.

Pure Python, no TensorFlow: tests/bench/harness_test.py imports it in
milliseconds, and bench/multiworker.py's parent process stays light.
"""

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
import statistics
import time
from typing import Any, TypeVar

Name = TypeVar('Name')
T = TypeVar('T')


# ---------------------------------------------------------------------------
# Warm-up and calibration.


def first_line(error: BaseException, limit: int = 200) -> str:
  """'ErrorType: the first line of the message', cut to `limit` chars."""
  lines = str(error).splitlines()
  return f'{type(error).__name__}: {(lines or [""])[0][:limit]}'


def warm_up(
    names: Iterable[Name], prepare: Callable[[Name], T], *,
    errors: tuple[type[BaseException], ...] = (),
    describe: Callable[[BaseException], str] = first_line,
) -> tuple[dict[Name, T], dict[Name, str]]:
  """Builds and warms up every method, one after another, untimed.

  Args:
    names: the methods, in the order the rounds will use.
    prepare: `prepare(name)` builds the method, calls it as often as its
      warm-up needs and returns what the rounds call (e.g. its `run`).
    errors: exception types that mean "this method cannot run here": the
      method is left out of the rounds and reported. Any other exception
      ends the benchmark.
    describe: the one line a failure is reported with.

  Returns:
    ({name: what `prepare` returned} for the methods that warmed up, in
    order; {name: describe(error)} for the others).
  """
  ready, failed = {}, {}
  for name in names:
    try:
      ready[name] = prepare(name)
    except errors as e:
      failed[name] = describe(e)
  return ready, failed


def timed(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
  """(fn(*args), its wall seconds)."""
  start = time.perf_counter()
  result = fn(*args)
  return result, time.perf_counter() - start


def calls_per_segment(seconds_per_segment: float, seconds_per_call: float,
                      *, multiple: int = 1) -> int:
  """The number of calls, at least `multiple` and a whole multiple of it,
  closest to filling `seconds_per_segment`.

  `multiple` keeps work that runs on one call in N (e.g. the Trainer's
  input-wait timing, one inner loop in 10) in every segment at its share.
  """
  calls = max(1, round(seconds_per_segment / seconds_per_call))
  return multiple * max(1, round(calls / multiple))


def calibrate(run: Callable[[int], Any], seconds_per_segment: float, *,
              multiple: int = 1, probe_calls: int = 2) -> int:
  """Times `run(probe_calls)` (after warm-up) and returns
  `calls_per_segment` for it: `run(n)` makes n calls."""
  _, seconds = timed(run, probe_calls)
  return calls_per_segment(seconds_per_segment, seconds / probe_calls,
                           multiple=multiple)


# ---------------------------------------------------------------------------
# Interleaved rounds.


def rotated(names: Sequence[Name], round_index: int) -> list[Name]:
  """Round r's order: `names` rotated left by r (A B C, B C A, C A B, ...),
  so each method runs first, and after each other one, equally often."""
  names = list(names)
  if not names:
    return names
  k = round_index % len(names)
  return names[k:] + names[:k]


def back_and_forth(names: Sequence[Name], round_index: int) -> list[Name]:
  """Round r's order: `names` on even rounds, reversed on odd ones (A B C,
  C B A, ...): a load that drifts over a round evens out over two."""
  names = list(names)
  return names if round_index % 2 == 0 else names[::-1]


def interleaved(
    names: Sequence[Name], rounds: int, *,
    order: Callable[[Sequence[Name], int], list[Name]] = rotated,
) -> Iterator[tuple[int, Name]]:
  """Yields (round index, name) for every method of every round, each
  round in `order(names, round index)`."""
  for r in range(rounds):
    for name in order(names, r):
      yield r, name


def build_order(names: Sequence[Name], process_index: int) -> list[Name]:
  """The order in which process `process_index` of several builds and warms
  up `names`: `rotated` by its index (A B C D, then B C D A, ...), so the
  first two processes build the first two methods in both orders. In one
  process the build order moved one method against another by up to ~12 %
  here (docs/benchmarks.md)."""
  return rotated(names, process_index)


def pooled(samples: Sequence[Mapping[Name, Sequence[float]]]
           ) -> dict[Name, list[float]]:
  """Per-round values of several processes, concatenated per method, for
  the methods that have values in every process: only then does round i of
  one method pair with round i of another (`paired_ratios`)."""
  merged: dict[Name, list[float]] = {}
  for process in samples:
    for name, values in process.items():
      merged.setdefault(name, []).extend(values)
  return {name: values for name, values in merged.items()
          if all(name in process for process in samples)}


def pooled_processes(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """The results of processes that measured the same methods, as one:
  'rates' `pooled`; 'first_loss' a list per method of every process's value;
  'failed' every process's failures, tagged with the process's number when
  there are several (a method that failed in one process has no pooled
  rates, and its rounds in the others show only in 'process_rates');
  'process_rates' the processes' own rates.

  Each result holds 'rates' {method: per-round values}, 'first_loss'
  {method: value} and 'failed' {method: why}.
  """
  first_loss: dict[str, list[float]] = {}
  failed: dict[str, str] = {}
  several = len(results) > 1
  for index, result in enumerate(results):
    tag = f' (process {index + 1})' if several else ''
    for name, loss in result['first_loss'].items():
      first_loss.setdefault(name, []).append(loss)
    for name, why in result['failed'].items():
      failed[name] = '; '.join(filter(None, [failed.get(name), why + tag]))
  return {'rates': pooled([result['rates'] for result in results]),
          'first_loss': first_loss, 'failed': failed,
          'process_rates': [result['rates'] for result in results]}


# ---------------------------------------------------------------------------
# Medians, spreads, ratios.


def medians(samples: Mapping[Name, Sequence[float]]) -> dict[Name, float]:
  """{name: median of its per-round values}."""
  return {name: statistics.median(values) for name, values in samples.items()}


def min_max(values: Iterable[float]) -> tuple[float, float]:
  values = list(values)
  return min(values), max(values)


def iqr(values: Iterable[float]) -> tuple[float, float]:
  """The first and third quartiles (statistics.quantiles' default,
  'exclusive' method); a single value is both."""
  values = list(values)
  if len(values) < 2:
    return values[0], values[0]
  first, _, third = statistics.quantiles(values, n=4)
  return first, third


def format_range(bounds: tuple[float, float], spec: str,
                 separator: str = '-') -> str:
  """E.g. format_range((0.891, 0.99), '.2f') == '0.89-0.99'."""
  low, high = bounds
  return f'{low:{spec}}{separator}{high:{spec}}'


def ratio(values: Mapping[Name, float], a: Name, b: Name) -> float | None:
  """values[a] / values[b]; None when either method has no value (it
  failed, or was not run)."""
  return values[a] / values[b] if a in values and b in values else None


def paired_ratios(a: Iterable[float], b: Iterable[float]) -> list[float]:
  """a / b within each round: a view that load drifts between rounds do
  not move, since both values of a pair ran back to back."""
  return [x / y for x, y in zip(a, b, strict=True)]


def median_paired_ratio(values: Mapping[Name, Sequence[float]], a: Name,
                        b: Name) -> float | None:
  """The median over rounds of a / b within each round; None when either
  method has no values. Unlike the ratio of medians it stays within the
  pairs when rounds of processes that ran at different speeds are pooled."""
  if not values.get(a) or not values.get(b):
    return None
  return statistics.median(paired_ratios(values[a], values[b]))


def format_ratio(value: float | None, spec: str = '.3f',
                 missing: str = 'n/a') -> str:
  return missing if value is None else format(value, spec)


# ---------------------------------------------------------------------------
# Tables.


def table_lines(rows: Sequence[Sequence[str]], widths: Sequence[int], *,
                left: int = 1) -> list[str]:
  """Fixed-width lines: the first `left` columns left-aligned, the others
  right-aligned, and a rule of dashes under the header (rows[0])."""
  lines = []
  for i, row in enumerate(rows):
    lines.append(
        ''.join(cell.ljust(w) for cell, w in zip(row[:left], widths[:left])) +
        ''.join(cell.rjust(w) for cell, w in zip(row[left:], widths[left:])))
    if i == 0:
      lines.append('-' * sum(widths))
  return lines


def print_table(rows: Sequence[Sequence[str]], widths: Sequence[int], *,
                left: int = 1) -> None:
  """Prints `table_lines(rows, widths, left=left)`."""
  for line in table_lines(rows, widths, left=left):
    print(line)
