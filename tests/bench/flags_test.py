"""Each benchmark refuses a count or a duration it cannot measure with,
in one line, before it measures anything."""

import os
import subprocess
import sys

import pytest

from tests import runner


@pytest.mark.parametrize('script, flag, message', [
    ('throughput.py', '--build_orders=0', '0 is not a positive integer'),
    ('throughput.py', '--rounds=0', '0 is not a positive integer'),
    ('throughput.py', '--num_cpu_devices=0', '0 is not a positive integer'),
    ('throughput.py', '--seconds_per_round=0', 'must be > 0'),
    ('step_cost.py', '--step_cost_seconds=-1', 'must be > 0'),
    ('data_service.py', '--segment_secs=0', 'must be > 0'),
    ('models.py', '--rounds=0', '0 is not a positive integer'),
    ('multiworker.py', '--timeout=0', '0 is not a positive integer'),
    ('checkpoint_cost.py', '--window_steps=0', '0 is not a positive integer'),
    ('startup.py', '--rounds=0', '0 is not a positive integer'),
])
def test_a_count_or_duration_below_one_is_one_line(script, flag, message):
  result = subprocess.run(
      [sys.executable, os.path.join('bench', script), flag],
      cwd=runner.REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'), check=False)
  assert result.returncode == 1, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines()
            if 'Flags parsing error' in line]
  name = flag.split('=')[0]
  assert len(errors) == 1, result.stderr[-2000:]
  assert errors[0].startswith(f'FATAL Flags parsing error: flag {name}=')
  assert errors[0].endswith(message), errors[0]
  assert not result.stdout  # Nothing measured, nothing reported.


@pytest.mark.parametrize('flags, message', [
    (('--baseline_python=/usr/bin/python3',),
     "--baseline_python='/usr/bin/python3' needs --baseline (e.g. --baseline=. "
     'for this checkout)'),
    (('--baseline=.', '--baseline_python=/no/such/python'),
     "--baseline_python='/no/such/python' is not an executable interpreter"),
])
def test_startup_refuses_a_baseline_python_it_cannot_run(flags, message):
  result = subprocess.run(
      [sys.executable, os.path.join('bench', 'startup.py'), *flags],
      cwd=runner.REPO, capture_output=True, text=True, timeout=120,
      check=False)
  assert result.returncode == 1, result.stderr[-2000:]
  assert message in result.stderr, result.stderr[-2000:]
  assert not result.stdout  # Nothing measured.
