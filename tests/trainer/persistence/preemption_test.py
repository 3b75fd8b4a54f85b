"""The SIGTERM guard outside the training loop: a Preempted that Python
drops (raised inside a finalizer) is raised again at the next phase, and
not printed where it was dropped."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest

from tests import runner
from trainer.persistence import preemption


class SigtermWhenCollected:

  def __del__(self):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)  # The guard runs here, inside __del__: its raise dropped.


def test_a_sigterm_dropped_in_a_finalizer_is_raised_at_the_next_phase(
    sigterm_guard, capfd):
  del sigterm_guard
  preemption.set_phase('restore')
  with warnings.catch_warnings():
    # pytest reports an exception Python dropped as this warning.
    warnings.simplefilter('error', pytest.PytestUnraisableExceptionWarning)
    SigtermWhenCollected()  # Collected at once; Python drops the raise.
  assert 'Exception ignored' not in capfd.readouterr().err
  with pytest.raises(preemption.Preempted, match='during restore'):
    preemption.set_phase('the final evaluation')


def test_installing_the_guard_again_wraps_the_unraisable_hook_once(
    sigterm_guard):
  del sigterm_guard
  hook = sys.unraisablehook
  preemption.install_guard()
  assert sys.unraisablehook is hook


def test_a_sigterm_dropped_before_training_stops_it_at_the_start(
    sigterm_guard):
  del sigterm_guard
  SigtermWhenCollected()
  with pytest.raises(preemption.Preempted, match='during start-up'):
    with preemption.SignalWatcher(lambda: None):
      pytest.fail('training started after a SIGTERM')


def test_ctrl_c_outside_training_is_one_line_and_exit_130(sigterm_guard):
  del sigterm_guard
  preemption.set_phase('restore')
  with pytest.raises(preemption.Preempted) as raised:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
  assert str(raised.value) == ('interrupted by SIGINT (Ctrl-C) during '
                                'restore: no training progress was lost')
  assert raised.value.exit_code(retryable_exit_code=143) == 130
  assert preemption.Preempted().exit_code(retryable_exit_code=143) == 143


# A process in a training loop's watcher whose stop request never ends (as
# when a lost worker blocks the all-reduce).
STUCK = textwrap.dedent('''
    import time
    from trainer.persistence import preemption
    preemption.install_guard()  # As main.py does.
    with preemption.SignalWatcher(lambda: print('stop requested', flush=True)):
      print('watching', flush=True)
      while True:
        time.sleep(1)
''')


def test_a_second_ctrl_c_exits_at_once_without_saving():
  stuck = subprocess.Popen([sys.executable, '-c', STUCK],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, cwd=runner.REPO)
  try:
    assert stuck.stdout.readline() == 'watching\n'
    stuck.send_signal(signal.SIGINT)
    assert stuck.stdout.readline() == 'stop requested\n'
    assert stuck.poll() is None  # Waits for the stop after the step.
    stuck.send_signal(signal.SIGINT)
    _, stderr = stuck.communicate(timeout=60)
  finally:
    stuck.kill()
  assert stuck.returncode == 130, stderr
  assert 'SIGINT received: stopping after the step in flight' in stderr
  assert ('SIGINT while stopping after SIGINT: exiting now, without waiting '
          'for the save (exit status 130)') in stderr
  assert 'Traceback' not in stderr


def test_outside_main_py_ctrl_c_stays_a_keyboard_interrupt():
  """A notebook or a test calling Controller.train: its Ctrl-C is not
  taken over (no install_guard)."""
  requested = []
  with pytest.raises(KeyboardInterrupt):
    with preemption.SignalWatcher(lambda: requested.append(True)):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(5)
  assert not requested


def test_a_sigterm_in_main_pys_first_moments_exits_42_in_one_line(tmp_path):
  """SIGTERM at 20-300 ms after `python main.py` starts: while Python
  starts (143, before any handler), while main.py's modules load, while its
  flags and config are read. The launcher stops a job's other workers so as
  soon as one fails; a traceback and exit 1 read as a permanent failure."""
  codes = []
  for delay in [d / 100 for d in range(2, 31)]:
    process = subprocess.Popen(
        runner.main_command('--config=configs/digits_mlp.py:smoke',
                            '--retryable_exit_code=143',
                            f'--model_dir={tmp_path / "run"}'),
        cwd=runner.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
    time.sleep(delay)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    codes.append(process.returncode)
    assert process.returncode in (-signal.SIGTERM, 143), (delay, stderr)
    assert 'Traceback' not in stderr, (delay, stderr)
    if process.returncode == 143:
      assert 'preempted by SIGTERM during start-up' in stderr, stderr
    assert not (tmp_path / 'run').exists()
  assert 143 in codes, codes  # Some landed after the guard.


@pytest.mark.parametrize('argv, code', [
    (['main.py', '--retryable_exit_code=143'], 143),
    (['main.py', '--retryable_exit_code', '143', '--mode=train'], 143),
    (['main.py', '--retryable_exit_code=7', '--retryable_exit_code', '9'], 9),
    (['main.py', '--retryable_exit_code'], None),
    (['main.py', '--retryable_exit_code=x'], None),
])
def test_the_retryable_code_is_read_from_argv_in_either_form(argv, code):
  """Before flags are parsed (a SIGTERM at start-up): as absl reads it."""
  assert preemption.retryable_code_in(argv) == code
