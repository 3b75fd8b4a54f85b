"""The goodput ledger: parts, input-wait split, lost work across processes,
the record on disk and the end-of-run line (a fake clock; the real runs
are in tests/resume_test.py)."""

import json
import os
import subprocess
import sys

import pytest

from tests import runner
from trainer.monitoring import goodput


class Clock:

  def __init__(self, now=1000.0):
    self.now = now

  def __call__(self):
    return self.now

  def advance(self, seconds):
    self.now += seconds


def ledger(directory=None, clock=None, start=1000.0):
  return goodput.Ledger(directory and str(directory), start=start,
                        clock=clock or Clock())


def test_parts_add_up_to_the_wall_time():
  clock = Clock()
  book = ledger(clock=clock)
  clock.advance(5)  # Start-up.
  book.begin_training(0)
  clock.advance(2)
  book.loop(step=10, steps=10, seconds=2, traced=True)
  for step in range(20, 101, 10):
    clock.advance(1)
    book.loop(step=step, steps=10, seconds=1, traced=False,
              input_wait=0.25 if step == 20 else None,
              loop_secs=1.0 if step == 20 else None)
  with book.timed('checkpoints'):
    clock.advance(0.5)
  with book.timed('eval'):
    clock.advance(1.5)
  totals = book.totals()
  parts = totals['parts_secs']
  assert totals['wall_secs'] == 18
  assert parts['startup'] == 5
  assert parts['tracing'] == 2
  # 9 s of loops, a quarter of it waiting for input (the share measured).
  assert parts['input_wait'] == pytest.approx(2.25)
  assert parts['productive'] == pytest.approx(6.75)
  assert parts['checkpoints'] == 0.5 and parts['eval'] == 1.5
  assert totals['unaccounted_secs'] == pytest.approx(0)
  assert totals['lost_steps'] == 0
  assert totals['shares']['productive'] == pytest.approx(6.75 / 18)


def test_a_rollback_moves_its_steps_to_lost():
  clock = Clock()
  book = ledger(clock=clock)
  book.begin_training(0)
  for step in (10, 20, 30):
    clock.advance(1)
    book.loop(step=step, steps=10, seconds=1, traced=False)
  book.lose(15)  # Restored step 15 after step 30.
  totals = book.totals()
  assert totals['lost_steps'] == 15
  assert totals['parts_secs']['lost'] == pytest.approx(1.5)
  assert totals['parts_secs']['productive'] == pytest.approx(1.5)
  assert goodput.line(totals).endswith(
      'lost 50.0% (15 steps rolled back); 3.0 s of wall time in 1 process')


def test_steps_after_the_restored_checkpoint_are_lost_in_the_next_process(
    tmp_path):
  clock = Clock()
  first = ledger(tmp_path, clock=clock)
  first.begin_training(0)
  for step in range(10, 71, 10):
    clock.advance(1)
    first.loop(step=step, steps=10, seconds=1, traced=False)
  # Killed (no finish): its record ends at step 70. The next process
  # restores ckpt-50.
  clock.advance(3)
  second = ledger(tmp_path, clock=clock, start=clock.now)
  clock.advance(2)
  second.begin_training(50)
  for step in (60, 70, 80):
    clock.advance(1)
    second.loop(step=step, steps=10, seconds=1, traced=False)
  line = second.finish()
  totals = json.loads((tmp_path / 'goodput.json').read_text())
  assert totals['processes'] == 2
  assert totals['lost_steps'] == totals['lost_steps_after_restarts'] == 20
  # 20 steps at the first process's 0.1 s per step.
  assert totals['parts_secs']['lost'] == pytest.approx(2)
  assert totals['parts_secs']['productive'] == pytest.approx(7 - 2 + 3)
  assert totals['parts_secs']['startup'] == pytest.approx(2)
  # The first process's wall time ends at its last record (step 70).
  assert totals['wall_secs'] == pytest.approx(7 + 5)
  assert 'lost 16.7% (20 steps after a restart)' in line
  assert sorted(os.listdir(tmp_path / 'goodput')) == ['0000.jsonl',
                                                      '0001.jsonl']
  # Append-only: one snapshot per loop, plus the start and the end.
  records = (tmp_path / 'goodput' / '0000.jsonl').read_text().splitlines()
  assert [json.loads(r)['step'] for r in records] == [0, 10, 20, 30, 40, 50,
                                                     60, 70]


def test_a_line_cut_short_by_a_kill_is_skipped(tmp_path):
  clock = Clock()
  first = ledger(tmp_path, clock=clock)
  first.begin_training(0)
  clock.advance(1)
  first.loop(step=10, steps=10, seconds=1, traced=False)
  with open(tmp_path / 'goodput' / '0000.jsonl', 'a') as f:
    f.write('{"start": 10')  # Killed mid-write.
  second = ledger(tmp_path, clock=clock)
  second.begin_training(0)
  assert second.lost_before == {'steps': 10, 'secs': 1.0}


def test_scalars_for_tensorboard():
  clock = Clock()
  book = ledger(clock=clock)
  clock.advance(1)
  book.begin_training(0)
  clock.advance(3)
  book.loop(step=30, steps=30, seconds=3, traced=False)
  scalars = book.scalars()
  assert scalars['goodput/productive_share'] == pytest.approx(0.75)
  assert scalars['goodput/startup_share'] == pytest.approx(0.25)
  assert scalars['goodput/lost_steps'] == 0


def test_no_directory_writes_nothing(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # Anything written to a relative path lands here.
  book = ledger(None)
  book.begin_training(0)
  book.loop(step=10, steps=10, seconds=1, traced=False)
  book.finish()
  assert not os.listdir(tmp_path)


def test_a_rollback_then_a_restart_counts_the_lost_steps_once(tmp_path):
  clock = Clock()
  first = ledger(tmp_path, clock=clock)
  first.begin_training(0)
  for step in (10, 20):
    clock.advance(1)
    first.loop(step=step, steps=10, seconds=1, traced=False)
  first.lose(10)  # A NaN at step 20: back to the checkpoint at step 10.
  first.finish()  # E.g. preempted right after the restore.
  second = ledger(tmp_path, clock=clock)
  second.begin_training(10)  # Restores the step-10 checkpoint.
  assert second.lost_before == {'steps': 0, 'secs': 0.0}
  assert second.totals()['lost_steps'] == 10


def test_unreadable_records_never_stop_training(tmp_path):
  (tmp_path / 'goodput').mkdir()
  (tmp_path / 'goodput' / '0000.jsonl').write_bytes(b'\xff\xfe{not json\n')
  (tmp_path / 'goodput' / '0001.jsonl').write_text('{"step": 5}\n')
  (tmp_path / 'goodput' / '0002.jsonl').write_text('')  # Killed at once.
  book = ledger(tmp_path)
  book.begin_training(0)
  book.finish()
  assert book.totals()['processes'] == 1
  # A file of its own, after every earlier one, even an empty one.
  assert (tmp_path / 'goodput' / '0003.jsonl').read_text()


def test_process_start_is_the_start_of_the_process():
  # A fresh interpreter notes the time first thing; the kernel's start of
  # the process is a little before (the interpreter's own start-up), not up
  # to a second before, as /proc/stat's boot time in whole seconds gave.
  code = ('import time; first = time.time()\n'
          'from trainer.monitoring import goodput\n'
          'print(first - goodput.process_start_time())')
  ahead = float(subprocess.run([sys.executable, '-c', code], cwd=runner.REPO,
                               capture_output=True, text=True,
                               check=True).stdout)
  assert -0.02 <= ahead < 0.5
