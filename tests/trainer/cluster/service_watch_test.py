"""service_watch.DispatcherWatch against a real port nobody listens on; only
its final exit (errors.exit_now, an os._exit) is replaced, so the test
process lives on."""

import threading

from absl import logging

from trainer.cluster import launch
from trainer.cluster import service_watch


class _Exited(BaseException):
  """Ends the watch thread where os._exit would end the process."""


def _watch_until_exit(monkeypatch, before_exit):
  exits, done = [], threading.Event()

  def fake_exit(code):
    exits.append(code)
    done.set()
    raise _Exited
  monkeypatch.setattr(service_watch.errors, 'exit_now', fake_exit)
  monkeypatch.setattr(threading, 'excepthook', lambda args: None)
  # A port that was free a moment ago and is closed again: nothing answers.
  address = f'grpc://127.0.0.1:{launch.free_ports(1)[0]}'
  watch = service_watch.DispatcherWatch(
      address, timeout=0.1, exit_code=75, before_exit=before_exit,
      interval=0.05)
  assert done.wait(timeout=30)
  watch.stop()
  return exits


def test_before_exit_runs_before_the_exit(monkeypatch, capsys):
  calls = []
  exits = _watch_until_exit(monkeypatch, lambda: calls.append('cleaned'))
  assert calls == ['cleaned'] and exits == [75]
  errors = [line for line in capsys.readouterr().err.splitlines()
            if line.startswith('error:')]
  assert len(errors) == 1 and 'has not answered' in errors[0]


def test_a_failing_before_exit_is_logged_and_the_exit_still_happens(
    monkeypatch):
  logged = []
  monkeypatch.setattr(logging, 'exception',
                      lambda message, *args: logged.append(message % args))

  def fail():
    raise OSError('read-only file system')
  assert _watch_until_exit(monkeypatch, fail) == [75]
  assert logged == ['cleaning up before the exit failed']
