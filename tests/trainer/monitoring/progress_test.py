"""Console progress lines, their cadence and ETA; the profile window."""

import logging
import re

import pytest

from trainer.experiment import cli
from trainer.monitoring import profiling
from trainer.monitoring import progress
from trainer.errors import UserError

# The form tests/resume_test.py reads the step from.
STEP_LINE = re.compile(r'^step (\d+)/\d+: ')


def loop(steps=10, loss=1.0, accuracy=0.5, wait=0.01, looped=0.1):
  result = {'loss': loss, 'accuracy': accuracy, 'examples': steps * 8.0,
            'steps': steps, 'grad_norm': 2.0}
  if wait is not None:
    result.update(input_wait_secs=wait, loop_secs=looped)
  return result


def logger(every_secs=0.0, total=100):
  return progress.ProgressLogger(total_steps=total, global_batch_size=8,
                                 main_metric='accuracy',
                                 every_secs=every_secs)


def test_every_inner_loop_by_default():
  log = logger()
  lines = [log.loop_done(step, loop(), 0.1, now=step / 10)
           for step in range(10, 101, 10)]
  assert all(lines)
  assert [int(STEP_LINE.match(l).group(1)) for l in lines] == list(
      range(10, 101, 10))
  # step 20 at t=2: 0.1 s per step since the first loop ended (t=1, step 10).
  assert lines[1] == ('step 20/100: loss=1 accuracy=0.5 examples/sec=800 '
                      'input_wait=10% ETA 0:00:08')
  assert lines[-1].endswith(' done')


def test_every_secs_logs_first_last_and_then_at_most_that_often():
  log = logger(every_secs=10)
  times = {10: 1, 20: 2, 30: 5, 40: 12, 50: 13, 60: 20, 70: 22, 80: 23, 90: 24,
           100: 25}
  logged = [step for step, now in times.items()
            if log.loop_done(step, loop(loss=step), 0.1, now=now)]
  assert logged == [10, 40, 70, 100]  # t = 1, 12, 22, and the last.


def test_a_line_averages_the_loops_since_the_last_line():
  log = logger(every_secs=10)
  log.loop_done(10, loop(), 0.1, now=1)
  assert log.loop_done(20, loop(steps=10, loss=1.0, accuracy=0.0), 0.1,
                       now=2) is None
  line = log.loop_done(50, loop(steps=30, loss=3.0, accuracy=1.0), 0.3,
                       now=11)
  # Examples 80 and 240: loss (80*1 + 240*3) / 320 = 2.5, accuracy 0.75.
  assert line.startswith('step 50/100: loss=2.5 accuracy=0.75 '
                         'examples/sec=800 ')


def test_untimed_loops_show_no_throughput():
  line = logger().loop_done(10, loop(wait=None), 5.0, now=5, untimed=True)
  assert line == 'step 10/100: loss=1 accuracy=0.5'


def test_a_line_shows_the_latest_input_wait_measured():
  log = logger()
  lines = [log.loop_done(10, loop(wait=None), 0.1, now=1),
           log.loop_done(20, loop(wait=0.03), 0.1, now=2),
           log.loop_done(30, loop(wait=None), 0.1, now=3)]
  assert 'input_wait' not in lines[0]
  assert ' input_wait=30% ' in lines[1] and ' input_wait=30% ' in lines[2]


def test_meter_means_and_throughput():
  meter = progress.Meter(global_batch_size=8, metric_names=('accuracy',))
  # Throughput leaves out the untimed loop; the input wait is over the
  # measuring loops' own time, whatever their wall time.
  meter.add(loop(steps=10, loss=1.0, wait=0.5, looped=1.5), seconds=9.0,
            untimed=True)
  meter.add(loop(steps=10, loss=3.0, wait=None), seconds=1.0)
  meter.add(loop(steps=30, loss=2.0, wait=0.25, looped=1.5), seconds=2.0)
  result = meter.result()
  assert result['loss'] == pytest.approx((10 + 30 + 60) / 50)
  assert result['grad_norm'] == 2.0
  assert result['steps_per_sec'] == pytest.approx(40 / 3)
  assert result['examples_per_sec'] == pytest.approx(40 / 3 * 8)
  assert result['input_wait_share'] == pytest.approx(0.75 / 3)
  meter.reset()
  assert meter.result() == {} and meter.steps == 0


def test_no_input_wait_when_a_loop_did_not_measure_it():
  meter = progress.Meter(global_batch_size=8)
  meter.add(loop(wait=None), seconds=1.0)
  meter.add(loop(wait=None), seconds=1.0)
  assert 'input_wait_share' not in meter.result()
  assert meter.result()['steps_per_sec'] == 10.0


def test_format_duration():
  assert progress.format_duration(7.4) == '0:00:07'
  assert progress.format_duration(93784) == '1 day, 2:03:04'


@pytest.mark.parametrize('value, expected', [
    ('', None), ('10,15', (10, 15)), ('1,1', (1, 1))])
def test_profile_steps_parse(value, expected):
  assert cli.parse_profile_steps(value) == expected


@pytest.mark.parametrize('value', ['5', '9,3', '0,2', 'a,b', '1,2,3', '1,'])
def test_bad_profile_steps_name_the_flag(value):
  with pytest.raises(UserError, match=re.escape(
      f"flag --profile_steps='{value}' must be START,END with 1 <= START <= "
      'END')):
    cli.parse_profile_steps(value)


@pytest.mark.parametrize('start, total, said', [
    (0, 60, None), (70, 100, 'the run starts at step 70, after them'),
    (0, 10, 'the run ends at step 10 (train.steps), before them')])
def test_a_profile_window_the_run_misses_is_said(tmp_path, caplog, start,
                                                 total, said):
  window = profiling.ProfileWindow(12, 14, logdir=str(tmp_path))
  with caplog.at_level(logging.WARNING):
    window.check_start(start, total)
  if said:
    assert f'--profile_steps=12,14: {said}; nothing is profiled' in (
        caplog.text)
  else:
    assert not caplog.text


def test_profile_window_runs_one_step_loops_inside_it(tmp_path):
  window = profiling.ProfileWindow(12, 14, logdir=str(tmp_path))
  step, loops = 0, []
  while step < 30:
    length = window.loop_length(step, 10)
    loops.append((step + length, window.covers(step)))
    step += length
  # (end of loop, traced): steps 12, 13 and 14 each in a loop of their own.
  assert loops == [(10, False), (11, False), (12, True), (13, True),
                   (14, True), (24, False), (34, False)]
