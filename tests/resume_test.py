"""Resuming main.py after kill -9, SIGTERM, a restart and damaged checkpoints.

Real processes and real signals: every assertion reads exit codes, logs and
the files left in model_dir. With --deterministic an interrupted run must end
in the same checkpoint, bit for bit, as a run that was never interrupted.
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import time

import pytest

from tests import runner

FULL = '--config=configs/digits_mlp.py'
SMOKE = '--config=configs/digits_mlp.py:smoke'
STRATEGY_FLAGS = {
    'default': (),
    'mirrored2': ('--strategy=mirrored', '--num_cpu_devices=2'),
}
# The kill -9 runs on mirrored use dropout: each replica draws its own masks,
# and the generators' state must come back from the checkpoint for the
# resumed run to draw what the uninterrupted one did.
KILL_FLAGS = {'default': (), 'mirrored2': ('--config.model.dropout=0.2',)}
# (train.steps, checkpoint.every_steps, train.steps_per_loop): a few seconds
# of training, many epochs of the 1,437 shuffled train images. Mirrored on 2
# logical CPUs runs ~5x fewer steps per second than 1 replica.
KILL_RUNS = {'default': (6000, 600, 50), 'mirrored2': (1200, 150, 25)}
NUM_KILLS = 2
# train.steps = train.steps_per_loop (the whole run is one inner loop), and
# the wait from 'TensorBoard summaries in' (logged once the loops are traced,
# right before training starts) to SIGTERM, as a multiple of the time it
# took to print that line: SIGTERM lands about a second into training on
# this machine (the loop takes ~3-5 s) and still mid-run on one twice as
# fast.
SIGTERM_RUNS = {'default': (16000, 0.2), 'mirrored2': (3000, 0.2)}
# Seconds from SIGTERM to exit: the step in flight, the save and the exit
# (main.py does not wait for interpreter shutdown, where destroying a
# mirrored train iterator used to take 1-30 s). Job managers wait ~30 s
# before SIGKILL; the margin is for a loaded 2-core machine.
EXIT_SECONDS = {'default': 10, 'mirrored2': 10}
# Seconds any one process may take. At most three run at once (2 cores).
TIMEOUT = 300

STEP_LINE = re.compile(
    r'^I\d{4} (\d\d):(\d\d):(\d\d\.\d+) .*\] step (\d+)/\d+: ', re.M)
RESTORED = re.compile(r'\] restored (\S+) \(step (\d+), data position (\d+)\)')
CKPT_INDEX = re.compile(r'ckpt-(\d+)\.index')


class Logged:
  """`python main.py ARGS` with stdout and stderr going to files in log_dir.

  The logs are read while the process runs; a pipe nobody reads would fill
  up and stall a long run.
  """

  def __init__(self, log_dir, name: str, *args: str, env=None):
    self.name = name
    self.stdout_path = log_dir / f'{name}.stdout'
    self.stderr_path = log_dir / f'{name}.stderr'
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', **(env or {}))
    with open(self.stdout_path, 'w') as out, open(self.stderr_path, 'w') as err:
      self.process = subprocess.Popen(runner.main_command(*args), stdout=out,
                                      stderr=err, cwd=runner.REPO, env=env)
    self.pid = self.process.pid

  def stdout(self) -> str:
    return self.stdout_path.read_text(errors='replace')

  def stderr(self) -> str:
    return self.stderr_path.read_text(errors='replace')

  def tail(self) -> str:
    return f'--- {self.name} stderr (tail) ---\n{self.stderr()[-3000:]}'

  def poll(self):
    return self.process.poll()

  def wait(self, timeout: float = TIMEOUT) -> int:
    return self.process.wait(timeout=timeout)

  def kill(self):
    self.process.kill()


@pytest.fixture
def started():
  """Registers processes; kills (by pid) any still running at teardown."""
  processes = []
  yield processes.append
  for process in processes:
    if process.poll() is None:
      process.kill()
      process.wait()


def checkpoint_steps(model_dir) -> list[int]:
  """Steps N of the ckpt-N.index files in model_dir, ascending."""
  if not os.path.isdir(model_dir):
    return []
  return sorted(int(m.group(1)) for m in
                (CKPT_INDEX.fullmatch(f) for f in os.listdir(model_dir)) if m)


def logged_steps(stderr: str) -> list[tuple[int, float]]:
  """(step, seconds since midnight) of each 'step N/T' absl log line."""
  return [(int(step), int(h) * 3600 + int(m) * 60 + float(s))
          for h, m, s, step in STEP_LINE.findall(stderr)]


def restored(stderr: str) -> tuple[str, int, int]:
  """(path, step, data position) of the one 'restored ...' log line."""
  (match,) = RESTORED.findall(stderr)
  return match[0], int(match[1]), int(match[2])


def lines_with(text: str, *needles: str) -> list[str]:
  return [l for l in text.splitlines() if all(n in l for n in needles)]


def wait_for(condition, *, run: Logged, what: str, timeout: float = TIMEOUT):
  """Polls condition() until truthy; fails if `run` exits or time runs out."""
  deadline = time.monotonic() + timeout
  while True:
    value = condition()
    if value:
      return value
    assert run.poll() is None, (
        f'{what}: {run.name} exited with {run.poll()} first\n{run.tail()}')
    assert time.monotonic() < deadline, (
        f'{what}: not within {timeout} s\n{run.tail()}')
    time.sleep(0.01)


def snapshot(model_dir) -> dict[str, bytes]:
  """{path relative to model_dir: bytes} of every file under it."""
  files = {}
  for root, _, names in os.walk(model_dir):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        files[os.path.relpath(path, model_dir)] = f.read()
  return files


def assert_bitwise_identical(model_dir, reference_dir, steps: int, *,
                             extra_saves: int = 0):
  """Every tensor of both latest checkpoints has the same bytes, but the
  count of saves, which is `extra_saves` more in model_dir."""
  for directory in (model_dir, reference_dir):
    assert checkpoint_steps(directory)[-1] == steps, os.listdir(directory)
  got = runner.checkpoint_values(str(model_dir))
  want = runner.checkpoint_values(str(reference_dir))
  assert got.keys() == want.keys()
  # tf.train.Checkpoint's count of the saves made: a preempted run made one
  # more (at the SIGTERM); a killed one resumed from a save with its count.
  saves = 'save_counter/.ATTRIBUTES/VARIABLE_VALUE'
  assert got.pop(saves) == want.pop(saves) + extra_saves >= 1
  for key in ('step/.ATTRIBUTES/VARIABLE_VALUE',
              'data_position/.ATTRIBUTES/VARIABLE_VALUE'):
    assert got[key] == steps, key
  assert len(got) > 10, sorted(got)  # Weights and Adam slots, not just steps.
  for key in sorted(want):
    assert got[key].dtype == want[key].dtype, key
    assert got[key].shape == want[key].shape, key
    assert got[key].tobytes() == want[key].tobytes(), key


def flip_bytes(path, offset: int, count: int = 16):
  with open(path, 'r+b') as f:
    f.seek(offset)
    data = f.read(count)
    f.seek(offset)
    f.write(bytes(b ^ 0xFF for b in data))


def truncate_to_half(path):
  os.truncate(path, os.path.getsize(path) // 2)


def data_file(model_dir, step: int):
  return model_dir / f'ckpt-{step}.data-00000-of-00001'


def index_file(model_dir, step: int):
  return model_dir / f'ckpt-{step}.index'


# -----------------------------------------------------------------------------
# Interruptions mid-run.


@pytest.mark.parametrize('strategy', ['default', 'mirrored2'])
def test_kill_9_at_random_points_then_resume_is_bitwise_identical(
    tmp_path, strategy, started):
  steps, every, per_loop = KILL_RUNS[strategy]
  args = (FULL, '--deterministic', *STRATEGY_FLAGS[strategy],
          *KILL_FLAGS[strategy], f'--config.train.steps={steps}',
          f'--config.checkpoint.every_steps={every}',
          f'--config.train.steps_per_loop={per_loop}')
  reference_dir, model_dir = tmp_path / 'reference', tmp_path / 'interrupted'
  reference = Logged(tmp_path, 'reference', *args,
                     f'--model_dir={reference_dir}')
  started(reference)
  rng = random.Random(f'kill-9-{strategy}')
  kills = []  # (exit status, newest checkpoint step on disk after the kill)

  def check_resumed(run: Logged):
    """A restart resumes from the newest checkpoint the last kill left,
    or from an older one after warning that the newer ones are damaged."""
    if not kills:
      return
    newest = kills[-1][1]
    stderr = run.stderr()
    path, step, position = restored(stderr)
    assert position == step
    assert path == f'{model_dir}/ckpt-{step}'
    if step != newest:
      assert step < newest, (step, newest)
      assert lines_with(stderr, f'ckpt-{newest}', 'incomplete or corrupt')

  for attempt in range(NUM_KILLS):
    if kills and kills[-1][1] == steps:
      break  # A kill landed after the last save: nothing left to interrupt.
    run = Logged(tmp_path, f'attempt{attempt}', *args,
                 f'--model_dir={model_dir}')
    started(run)

    def training_with_checkpoint():
      # The step rate over >= 0.25 s of inner loops after the first (which
      # includes the trace), once a checkpoint is on disk.
      lines = logged_steps(run.stderr())
      if len(lines) < 3 or not checkpoint_steps(model_dir):
        return None
      (step_a, time_a), (step_b, time_b) = lines[1], lines[-1]
      seconds = (time_b - time_a) % 86400  # The log shows time of day.
      return seconds >= 0.25 and (step_b, (step_b - step_a) / seconds)

    step, rate = wait_for(training_with_checkpoint, run=run,
                          what='training with a checkpoint on disk')
    check_resumed(run)
    # A random moment in the rest of the run.
    time.sleep(rng.uniform(0.05, 0.5) * (steps - step) / rate)
    os.kill(run.pid, signal.SIGKILL)
    status = run.wait()
    kills.append((status, checkpoint_steps(model_dir)[-1]))

  final = Logged(tmp_path, 'final', *args, f'--model_dir={model_dir}')
  started(final)
  assert final.wait() == 0, final.tail()
  check_resumed(final)
  assert reference.wait() == 0, reference.tail()

  assert [status for status, _ in kills] == [-signal.SIGKILL] * len(kills), (
      f'a run ended before its kill: {kills}')
  assert any(0 < step < steps for _, step in kills), (
      f'no kill landed mid-run: {kills}')
  assert_bitwise_identical(model_dir, reference_dir, steps)
  assert (runner.final_eval(final.stdout()) ==
          runner.final_eval(reference.stdout()))
  rng_keys = [k for k in runner.checkpoint_values(str(model_dir))
              if k.startswith('rng/')]
  assert len(rng_keys) == (2 if KILL_FLAGS[strategy] else 0)  # 2 Dropouts.


# What a run stopped by each signal prints and exits with.
STOPPED_BY = {signal.SIGTERM: ('preempted by SIGTERM', 42),
              signal.SIGINT: ('interrupted by SIGINT (Ctrl-C)', 130)}


@pytest.mark.parametrize('strategy, signum', [
    ('default', signal.SIGTERM), ('mirrored2', signal.SIGTERM),
    ('default', signal.SIGINT)], ids=['default', 'mirrored2', 'ctrl_c'])
def test_sigterm_saves_and_exits_42_then_resume_is_bitwise_identical(
    tmp_path, strategy, signum, started):
  """SIGTERM (a preemption) or SIGINT (Ctrl-C) mid inner loop."""
  steps, delay_factor = SIGTERM_RUNS[strategy]
  stopped_by, exit_code = STOPPED_BY[signum]
  # One inner loop of all the steps and no periodic checkpoint: the only
  # checkpoint before the end is the one SIGTERM makes, mid inner loop.
  args = (FULL, '--deterministic', *STRATEGY_FLAGS[strategy],
          *KILL_FLAGS[strategy], f'--config.train.steps={steps}',
          f'--config.train.steps_per_loop={steps}',
          '--config.checkpoint.every_steps=0')
  reference_dir, model_dir = tmp_path / 'reference', tmp_path / 'preempted'
  # Started alone (the reference comes later) so that start-up runs at the
  # speed the delay was measured at.
  start = time.monotonic()
  temp = tmp_path / 'tmp'  # Its TMPDIR, checked for AutoGraph's files.
  temp.mkdir()
  run = Logged(tmp_path, 'preempted', *args, f'--model_dir={model_dir}',
               env={'TMPDIR': str(temp)})
  started(run)
  wait_for(lambda: 'TensorBoard summaries in' in run.stderr(), run=run,
           what="the 'TensorBoard summaries in' log line")
  time.sleep(delay_factor * (time.monotonic() - start))
  assert run.poll() is None, run.tail()
  os.kill(run.pid, signum)
  sent = time.monotonic()
  saved_after = None  # Seconds to the log line written once the save is done.
  while run.poll() is None:
    if saved_after is None and stopped_by in run.stderr():
      saved_after = time.monotonic() - sent
    assert time.monotonic() - sent < TIMEOUT, run.tail()
    time.sleep(0.01)
  exited_after = time.monotonic() - sent

  assert run.poll() == exit_code, run.tail()
  assert (saved_after or exited_after) < 5, (
      f'checkpoint saved {saved_after or exited_after:.1f} s after SIGTERM')
  assert exited_after < EXIT_SECONDS[strategy], (
      f'exited {exited_after:.1f} s after SIGTERM')
  (saved,) = checkpoint_steps(model_dir)
  assert 0 < saved < steps, f'saved ckpt-{saved} of a {steps}-step inner loop'
  stderr = run.stderr()
  assert lines_with(stderr, f'{signal.Signals(signum).name} received')
  assert lines_with(stderr, f'{stopped_by} during training: saved '
                    f'{model_dir}/ckpt-{saved} at step {saved}')
  assert 'Traceback' not in stderr
  assert not list(temp.iterdir())  # Removed although os._exit skips atexit.

  reference = Logged(tmp_path, 'reference', *args,
                     f'--model_dir={reference_dir}')
  started(reference)
  resume = Logged(tmp_path, 'resume', *args, f'--model_dir={model_dir}')
  started(resume)
  assert resume.wait() == 0, resume.tail()
  assert restored(resume.stderr()) == (f'{model_dir}/ckpt-{saved}', saved,
                                       saved)
  assert reference.wait() == 0, reference.tail()
  assert_bitwise_identical(model_dir, reference_dir, steps, extra_saves=1)
  assert (runner.final_eval(resume.stdout()) ==
          runner.final_eval(reference.stdout()))


def test_a_sigterm_during_a_long_evaluation_exits_within_seconds(
    tmp_path, started):
  """An evaluation is one tf.function call, during which Python runs no
  signal handler: the guard's thread exits with the preemption's status
  once the main thread has not acted for a few seconds (there is nothing
  to save outside training)."""
  model_dir = tmp_path / 'run'
  args = ('--config=tests/user_config.py',
          '--config.trainer=tests.user_trainers:LongEvalSplit',
          '--config.train.steps=4', '--config.train.steps_per_loop=2',
          f'--model_dir={model_dir}')
  trained = runner.run_main(*args, timeout=TIMEOUT)
  assert trained.returncode == 0, trained.stderr[-3000:]
  # Minutes of evaluation: 100,000 passes over the test split.
  evaluating = Logged(tmp_path, 'eval', *args, '--mode=eval',
                      env={'DISTLOOP_TEST_EVAL_REPEATS': '100000'})
  started(evaluating)
  wait_for(lambda: '] restored ' in evaluating.stderr(), run=evaluating,
           what='the restore log line')
  time.sleep(2)  # Into the evaluation's tf.function call.
  assert evaluating.poll() is None, evaluating.tail()
  evaluating.process.send_signal(signal.SIGTERM)
  # Not minutes: GRACE_SECS (3 s) and the exit.
  assert evaluating.wait(timeout=30) == 42, evaluating.tail()
  stderr = evaluating.stderr()
  assert lines_with(stderr, 'SIGTERM received during evaluation, which '
                    'TensorFlow does not interrupt: exiting now')
  assert lines_with(stderr, 'preempted by SIGTERM during evaluation: nothing '
                    'new to save since the last checkpoint')
  assert 'final eval' not in evaluating.stdout()


@pytest.mark.parametrize('trainer,strategy', [
    ('LongEvalSplit', 'default'), ('LongEvalSplit', 'mirrored2'),
    ('LongEvalGathered', 'default')])
def test_a_sigterm_during_a_periodic_evaluation_saves_and_exits_at_once(
    tmp_path, started, trainer, strategy):
  """train_and_eval: a SIGTERM during an evaluation of minutes ends it after
  the batch in flight (in the loop's tf.function call, or between the
  host's calls when eval_outputs is gathered), reports none of it, saves the
  step and exits 42; the resumed run evaluates step 8 first, then trains
  on to the end."""
  model_dir = tmp_path / 'run'
  args = ('--config=tests/user_config.py',
          f'--config.trainer=tests.user_trainers:{trainer}',
          '--config.train.steps=16', '--config.train.steps_per_loop=4',
          '--config.eval.every_steps=8', '--config.checkpoint.every_steps=4',
          '--mode=train_and_eval', f'--model_dir={model_dir}',
          *STRATEGY_FLAGS[strategy])
  training = Logged(tmp_path, 'train', *args,
                    env={'DISTLOOP_TEST_EVAL_REPEATS': '100000'})
  started(training)
  wait_for(lambda: lines_with(training.stderr(), 'step 8/16'), run=training,
           what='the step 8 log line')
  time.sleep(2)  # Into the evaluation at step 8 (minutes long).
  assert training.poll() is None, training.tail()
  training.process.send_signal(signal.SIGTERM)
  assert training.wait(timeout=30) == 42, training.tail()
  stderr = training.stderr()
  assert lines_with(stderr, 'the evaluation at step 8 was stopped before the '
                    'end of its split: not reported'), training.tail()
  assert lines_with(stderr, 'preempted by SIGTERM during training: saved',
                    'ckpt-8 at step 8'), training.tail()
  assert not (model_dir / 'eval' / 'metrics.jsonl').exists()
  assert checkpoint_steps(model_dir)[-1] == 8
  if strategy != 'default' or trainer != 'LongEvalSplit':
    return
  resumed = runner.run_main(*args, timeout=TIMEOUT)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert RESTORED.search(resumed.stderr).group(2) == '8'
  # The stopped evaluation runs first, on the weights of step 8.
  assert lines_with(resumed.stderr, 'the evaluation at step 8 did not finish '
                    'before the restart: evaluating it first')
  records = [json.loads(l) for l in
             (model_dir / 'eval' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records] == [8, 16]
  assert checkpoint_steps(model_dir)[-1] == 16


def test_a_second_run_into_a_model_dir_in_training_is_refused(tmp_path,
                                                              started):
  """One command started twice: the second stops in one line naming the
  first one's pid and writes nothing; the first trains on, and once it has
  ended (SIGTERM, 42) a restart finds no stale lock."""
  model_dir = tmp_path / 'run'
  args = (SMOKE, '--config.train.steps=1000000',
          '--config.checkpoint.every_steps=100', f'--model_dir={model_dir}')
  first = Logged(tmp_path, 'first', *args)
  started(first)
  wait_for(lambda: 'TensorBoard summaries in' in first.stderr(), run=first,
           what="the 'TensorBoard summaries in' log line")
  second = runner.run_main(*args, timeout=TIMEOUT)
  assert assert_one_line_error(second) == (
      f"error: flag --model_dir='{model_dir}' is in use by another training "
      f'run (pid {first.pid}); wait for it to end or stop it, or pass '
      'another --model_dir')
  assert first.poll() is None, first.tail()
  os.kill(first.pid, signal.SIGTERM)
  assert first.wait() == 42, first.tail()
  assert len(os.listdir(model_dir / 'goodput')) == 1  # The first's record.
  saved = checkpoint_steps(model_dir)[-1]
  resumed = runner.run_main(SMOKE, f'--config.train.steps={saved + 10}',
                            f'--model_dir={model_dir}', timeout=TIMEOUT)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert restored(resumed.stderr)[1] == saved
  assert checkpoint_steps(model_dir)[-1] == saved + 10


# -----------------------------------------------------------------------------
# Restarts over a finished run: nothing retrained, damage handled, mismatches
# refused. Each test works on its own copy of one finished 40-step run.

SMALL_RUN = (SMOKE, '--deterministic', '--config.train.steps=40',
             '--config.checkpoint.every_steps=10',
             '--config.checkpoint.max_to_keep=10')


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """(model_dir, final eval) of a finished run with ckpt-10 ... ckpt-40."""
  model_dir = tmp_path_factory.mktemp('finished') / 'run'
  result = runner.run_main(*SMALL_RUN, f'--model_dir={model_dir}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert checkpoint_steps(model_dir) == [10, 20, 30, 40]
  return model_dir, runner.final_eval(result.stdout)


def copy_run(finished_run, tmp_path):
  model_dir = tmp_path / 'run'
  shutil.copytree(finished_run[0], model_dir)
  return model_dir


def assert_one_line_error(result) -> str:
  assert result.returncode == 2, result.stderr[-3000:]
  errors = runner.error_lines(result.stderr)
  assert len(errors) == 1, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1] == errors[0]
  assert 'Traceback' not in result.stderr
  return errors[0]


# -----------------------------------------------------------------------------
# Goodput: where the time went, and the work a kill lost.


def goodput_totals(model_dir) -> dict:
  with open(os.path.join(model_dir, 'goodput.json')) as f:
    return json.load(f)


def assert_parts_add_up(totals):
  """The parts account for the wall time, to a few percent or 3 s (what is
  left: building the train iterator, the controller's own bookkeeping, which
  grow on a loaded machine: 2.1 s of 41 s seen with the suite and a second
  job sharing 2 cores)."""
  wall, parts = totals['wall_secs'], totals['parts_secs']
  assert wall > 0 and all(v >= 0 for v in parts.values()), totals
  assert abs(wall - sum(parts.values())) <= max(0.05 * wall, 3.0), totals
  assert totals['unaccounted_secs'] == pytest.approx(
      wall - sum(parts.values()))
  assert parts['startup'] > 0 and parts['productive'] > 0, totals


def test_goodput_of_a_clean_run_has_no_lost_steps(finished_run):
  model_dir, _ = finished_run
  totals = goodput_totals(model_dir)
  assert totals['processes'] == 1
  assert totals['lost_steps'] == 0 and totals['parts_secs']['lost'] == 0
  assert totals['parts_secs']['eval'] > 0  # The final evaluation.
  assert totals['parts_secs']['checkpoints'] > 0
  assert_parts_add_up(totals)
  (record,) = os.listdir(model_dir / 'goodput')
  steps = [json.loads(line)['step'] for line in
           (model_dir / 'goodput' / record).read_text().splitlines()]
  assert steps[0] == 0 and steps[-1] == 40 and steps == sorted(steps)


def test_goodput_counts_the_steps_a_kill_9_lost(tmp_path, started):
  kill_at = 70
  args = (FULL, '--config.trainer=tests.user_trainers:KilledAtStep',
          '--config.train.steps=200', '--config.train.steps_per_loop=10',
          '--config.checkpoint.every_steps=50', f'--model_dir={tmp_path}/run')
  killed = Logged(tmp_path, 'killed', *args,
                  env={'DISTLOOP_TEST_KILL_AT': str(kill_at)})
  started(killed)
  assert killed.wait() == -signal.SIGKILL, killed.tail()
  assert goodput_totals(tmp_path / 'run')['lost_steps'] == 0
  resumed = Logged(tmp_path, 'resumed', *args)
  started(resumed)
  assert resumed.wait() == 0, resumed.tail()

  _, restored_step, _ = restored(resumed.stderr())
  assert 0 < restored_step < kill_at
  lost = kill_at - restored_step  # Computed once before the kill, again now.
  totals = goodput_totals(tmp_path / 'run')
  assert totals['processes'] == 2
  assert totals['lost_steps'] == totals['lost_steps_after_restarts'] == lost
  assert totals['parts_secs']['lost'] > 0
  assert_parts_add_up(totals)
  (line,) = lines_with(resumed.stderr(), '] goodput: ', '% productive; ')
  assert f'({lost} steps after a restart)' in line, line
  assert 'in 2 processes' in line, line


def test_finished_run_started_again_trains_nothing(tmp_path, finished_run):
  model_dir = copy_run(finished_run, tmp_path)
  before = snapshot(model_dir)
  result = runner.run_main(*SMALL_RUN, f'--model_dir={model_dir}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert lines_with(result.stderr, 'already trained')
  assert not logged_steps(result.stderr)
  after = snapshot(model_dir)
  assert ({k: v for k, v in after.items() if k.startswith('ckpt-')} ==
          {k: v for k, v in before.items() if k.startswith('ckpt-')})
  assert checkpoint_steps(model_dir) == [10, 20, 30, 40]
  assert runner.final_eval(result.stdout) == finished_run[1]
  # Its final evaluation is made again (the eval split or metrics may have
  # changed since), and recorded again.
  records = [json.loads(line) for line in
             after['eval/metrics.jsonl'].decode().splitlines()]
  assert records[:-1] == [json.loads(line) for line in
                          before['eval/metrics.jsonl'].decode().splitlines()]
  assert records[-1] == records[-2]


def test_corrupt_newest_checkpoint_falls_back_to_older(tmp_path, finished_run,
                                                       started):
  model_dir = copy_run(finished_run, tmp_path)
  truncate_to_half(data_file(model_dir, 40))
  flip_bytes(data_file(model_dir, 30),
             os.path.getsize(data_file(model_dir, 30)) // 2)
  more_steps = ('--config.train.steps=60',)
  resume = Logged(tmp_path, 'resume', *SMALL_RUN, *more_steps,
                  f'--model_dir={model_dir}')
  straight = Logged(tmp_path, 'straight', *SMALL_RUN, *more_steps,
                    f'--model_dir={tmp_path / "straight"}')
  started(resume)
  started(straight)
  assert resume.wait() == 0, resume.tail()
  assert straight.wait() == 0, straight.tail()

  stderr = resume.stderr()
  for step in (40, 30):
    assert lines_with(stderr, f'{model_dir}/ckpt-{step}',
                      'incomplete or corrupt'), resume.tail()
  assert restored(stderr) == (f'{model_dir}/ckpt-20', 20, 20)
  assert logged_steps(stderr)[0][0] == 30  # Trained on from step 20.
  assert checkpoint_steps(model_dir) == [10, 20, 30, 40, 50, 60]
  # Falling back lost nothing but time: same bits as a run never damaged.
  assert_bitwise_identical(model_dir, tmp_path / 'straight', 60)
  assert (runner.final_eval(resume.stdout()) ==
          runner.final_eval(straight.stdout()))


def test_all_checkpoints_corrupt_is_one_line_error(tmp_path, finished_run):
  model_dir = copy_run(finished_run, tmp_path)
  flip_bytes(index_file(model_dir, 10), 100)
  flip_bytes(data_file(model_dir, 20),
             os.path.getsize(data_file(model_dir, 20)) // 2)
  os.truncate(index_file(model_dir, 30), 0)
  truncate_to_half(data_file(model_dir, 40))
  before = snapshot(model_dir)
  result = runner.run_main(*SMALL_RUN, '--config.train.steps=60',
                           f'--model_dir={model_dir}')
  error = assert_one_line_error(result)
  assert f'--model_dir={model_dir}' in error
  assert snapshot(model_dir) == before


@pytest.mark.parametrize('flags, setting', [
    (('--config.train.global_batch_size=32',),
     r'train\.global_batch_size: 64 -> 32'),
    (('--config.model.hidden_sizes=(32,64)',),
     r"model weights '\S+': \[[\d, ]+\] -> \[[\d, ]*32\]"),
    (('--config.data.name=synthetic', '--config.model.input_dim=100'),
     r"data 'name': 'digits' -> 'synthetic'"),
], ids=['global_batch_size', 'model_shape', 'dataset'])
def test_resume_mismatch_is_refused(tmp_path, finished_run, flags, setting):
  model_dir = copy_run(finished_run, tmp_path)
  before = snapshot(model_dir)
  result = runner.run_main(*SMALL_RUN, *flags, f'--model_dir={model_dir}')
  error = assert_one_line_error(result)
  assert re.search(setting, error), error
  assert f'--model_dir={model_dir}' in error
  assert snapshot(model_dir) == before


def test_sigterm_outside_training_exits_with_the_retryable_code(tmp_path,
                                                                started):
  """SIGTERM during start-up (TensorFlow's import) and during the final
  evaluation: the retryable status (here --retryable_exit_code=143), one
  log line naming the phase, no traceback; the last checkpoint stays."""
  model_dir = tmp_path / 'run'
  args = ('--config=tests/user_config.py',
          '--config.trainer=tests.user_trainers:SlowEval',
          '--retryable_exit_code=143', f'--model_dir={model_dir}')
  early = Logged(tmp_path, 'early', *args)
  started(early)
  time.sleep(0.5)
  os.kill(early.pid, signal.SIGTERM)
  assert early.wait() == 143, early.tail()
  assert lines_with(early.stderr(), 'preempted by SIGTERM during start-up')
  assert 'Traceback' not in early.stderr()
  assert not checkpoint_steps(model_dir)
  late = Logged(tmp_path, 'late', *args)
  started(late)
  # The final evaluation (~5 s: 0.3 s per batch) is running.
  wait_for(lambda: 'slow eval batch' in late.stderr().partition('ckpt-16')[2],
           run=late, what='the final evaluation')
  os.kill(late.pid, signal.SIGTERM)
  assert late.wait() == 143, late.tail()
  assert lines_with(late.stderr(),
                    'preempted by SIGTERM during the final evaluation')
  assert 'Traceback' not in late.stderr()
  assert checkpoint_steps(model_dir) == [16]
