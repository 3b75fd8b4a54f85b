"""--strategy/--tpu/TF_CONFIG handling, and the TPU path as far as it runs here."""

import json
import socket
import subprocess
import sys
import time

import pytest
import tensorflow as tf

from tests import runner
from trainer.cluster import strategies
from trainer.errors import UserError


def test_mirrored_uses_every_logical_cpu():
  strategy = strategies.build_strategy('mirrored')
  assert strategy.num_replicas_in_sync == len(
      tf.config.list_logical_devices('CPU')) == 4


@pytest.mark.parametrize('name', ['default', 'one_device'])
def test_single_replica_strategies(name):
  assert strategies.build_strategy(name).num_replicas_in_sync == 1


def test_unknown_strategy_lists_choices():
  with pytest.raises(UserError, match="--strategy='horovod' is unknown; "
                     'valid: default, one_device, mirrored'):
    strategies.build_strategy('horovod')


def test_tpu_flag_needs_tpu_strategy():
  with pytest.raises(UserError, match='needs --strategy=tpu'):
    strategies.build_strategy('mirrored', tpu='my-tpu')


def test_tpu_strategy_needs_tpu_flag():
  with pytest.raises(UserError, match='needs --tpu=NAME'):
    strategies.build_strategy('tpu')


def test_tpu_name_off_cloud_fails_fast_naming_the_flag():
  start = time.monotonic()
  with pytest.raises(UserError, match="flag --tpu=no-such-tpu"):
    strategies.build_strategy('tpu', tpu='no-such-tpu', tpu_timeout=60)
  assert time.monotonic() - start < 60


def test_tpu_local_without_a_tpu_says_to_run_on_a_tpu_vm():
  with pytest.raises(UserError) as raised:
    strategies.build_strategy('tpu', tpu='local', tpu_timeout=60)
  message = str(raised.value)
  assert message.startswith('flag --tpu=local: could not connect to the TPU')
  assert message.endswith('; run on a TPU VM, or pass --tpu=NAME of a TPU node')


def test_tpu_address_with_nothing_listening_times_out():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  address = f'grpc://127.0.0.1:{port}'
  start = time.monotonic()
  with pytest.raises(UserError, match=f'flag --tpu={address}: nothing '
                     f'answered at 127.0.0.1:{port} within 3s'):
    strategies.build_strategy('tpu', tpu=address, tpu_timeout=3)
  assert time.monotonic() - start < 30


def test_malformed_tpu_address_is_an_error():
  with pytest.raises(UserError, match='not of the form grpc://HOST:PORT'):
    strategies.build_strategy('tpu', tpu='grpc://nohostport')


def test_multi_worker_needs_tf_config(monkeypatch):
  monkeypatch.delenv('TF_CONFIG', raising=False)
  with pytest.raises(UserError, match='needs the TF_CONFIG'):
    strategies.build_strategy('multi_worker_mirrored')


def test_multi_worker_rejects_invalid_json(monkeypatch):
  monkeypatch.setenv('TF_CONFIG', '{"cluster": ')
  with pytest.raises(UserError, match='TF_CONFIG is not valid JSON'):
    strategies.build_strategy('multi_worker_mirrored')


def test_a_worker_whose_port_is_taken_is_one_line_naming_it(monkeypatch):
  with socket.socket() as holder:
    holder.bind(('127.0.0.1', 0))
    holder.listen()
    port = holder.getsockname()[1]
    monkeypatch.setenv('TF_CONFIG', json.dumps({
        'cluster': {'worker': ['127.0.0.1:1', f'127.0.0.1:{port}']},
        'task': {'type': 'worker', 'index': 1}}))
    with pytest.raises(UserError) as raised:
      strategies.build_strategy('multi_worker_mirrored', cluster_timeout=5)
  assert str(raised.value) == (
      f'TF_CONFIG task worker:1: port {port} of 127.0.0.1:{port} is in use on '
      'this host (Address already in use); stop what holds it or give the '
      'task another port')


def test_num_cpu_devices_below_one_is_an_error():
  with pytest.raises(UserError, match='--num_cpu_devices=0 must be >= 1'):
    strategies.configure_cpu_devices(0)


def test_a_silent_tpu_address_fails_within_the_timeout_in_one_line(tmp_path):
  """A listener that accepts TCP connections and never answers: main.py
  exits 2 with one line within --tpu_timeout and a few seconds."""
  with socket.socket() as listener:
    listener.bind(('127.0.0.1', 0))
    listener.listen()
    port = listener.getsockname()[1]
    start = time.monotonic()
    result = runner.run_main('--config=configs/digits_mlp.py:smoke',
                             '--strategy=tpu', f'--tpu=grpc://127.0.0.1:{port}',
                             '--tpu_timeout=5', f'--model_dir={tmp_path / "r"}',
                             timeout=120)
    elapsed = time.monotonic() - start
  assert result.returncode == 2, result.stderr[-2000:]
  (line,) = runner.error_lines(result.stderr)
  assert (f'flag --tpu=grpc://127.0.0.1:{port}: 127.0.0.1:{port} accepted a '
          'connection but did not answer gRPC within 5s') in line
  assert elapsed < 5 + 20  # TensorFlow's import, then the 5 s.
  assert not (tmp_path / 'r').exists()


def test_the_watchdog_kills_a_stuck_process_with_one_line():
  code = ('import time\n'
          'from trainer.cluster.strategies import _Watchdog\n'
          'watchdog = _Watchdog(0.5, "error: stuck")\n'
          'time.sleep(60)\n')
  result = subprocess.run([sys.executable, '-c', code], cwd=runner.REPO,
                          capture_output=True, text=True, timeout=60,
                          check=False)
  assert result.returncode == -9
  assert result.stderr.strip().splitlines()[-1] == 'error: stuck'
  code = ('from trainer.cluster.strategies import _Watchdog\n'
          'watchdog = _Watchdog(30, "error: stuck")\n'
          'watchdog.stop()\n')
  result = subprocess.run([sys.executable, '-c', code], cwd=runner.REPO,
                          capture_output=True, text=True, timeout=60,
                          check=False)
  assert result.returncode == 0 and 'stuck' not in result.stderr
