"""Running main.py in a subprocess and reading what it leaves on disk."""

import glob
import json
import os
import socket
import subprocess
import sys

import tensorflow as tf

from models import mlp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO, 'main.py')


def main_command(*args):
  return [sys.executable, MAIN, *args]


def run_main(*args, timeout=300, cwd=None, env=None):
  """Runs `python main.py ARGS`; returns the CompletedProcess (text)."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', **(env or {}))
  return subprocess.run(main_command(*args), capture_output=True, text=True,
                        timeout=timeout, cwd=cwd or REPO, env=env, check=False)


def start_main(*args, cwd=None, env=None):
  """Starts `python main.py ARGS` without waiting (for parallel runs)."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', **(env or {}))
  return subprocess.Popen(main_command(*args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=cwd or REPO,
                          env=env)


def final_eval(stdout: str) -> dict[str, float]:
  """Parses the last line, 'final eval: k=v k=v', into a dict."""
  last = stdout.strip().splitlines()[-1]
  assert last.startswith('final eval: '), last
  return {k: float(v) for k, v in
          (pair.split('=') for pair in last[len('final eval: '):].split())}


def checkpoint_values(model_dir: str) -> dict:
  """{checkpoint key: numpy value} of every tensor in the latest checkpoint."""
  path = tf.train.latest_checkpoint(model_dir)
  assert path, f'no checkpoint in {model_dir}: {os.listdir(model_dir)}'
  reader = tf.train.load_checkpoint(path)
  return {key: reader.get_tensor(key)
          for key in reader.get_variable_to_shape_map()
          if key != '_CHECKPOINTABLE_OBJECT_GRAPH'}


def restored_model_weights(model_dir: str) -> list:
  """Weights of an MLP rebuilt from model_dir/config.json and restored from
  the latest checkpoint's `model` key, as a user would load them."""
  with open(os.path.join(model_dir, 'config.json')) as f:
    config = json.load(f)['model']
  model = mlp.build_mlp(input_dim=config['input_dim'],
                        hidden_sizes=config['hidden_sizes'],
                        num_classes=config['num_classes'])
  status = tf.train.Checkpoint(model=model).read(
      tf.train.latest_checkpoint(model_dir))
  status.expect_partial().assert_existing_objects_matched()
  return model.get_weights()


_SERVERS = []  # Kept alive for the life of the process.


def loopback_cluster(num_ps: int):
  """A resolver of one worker and `num_ps` ps servers started in this
  process on free 127.0.0.1 ports (for a ParameterServerStrategy)."""
  def address():
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      return '127.0.0.1:%d' % s.getsockname()[1]
  spec = tf.train.ClusterSpec({'worker': [address()],
                               'ps': [address() for _ in range(num_ps)]})
  _SERVERS.extend(tf.distribute.Server(spec, job_name=job, task_index=i)
                  for job in ('worker', 'ps')
                  for i in range(len(spec.as_dict()[job])))
  return tf.distribute.cluster_resolver.SimpleClusterResolver(
      spec, rpc_layer='grpc')


def error_lines(stderr: str) -> list[str]:
  return [l for l in stderr.splitlines() if l.startswith('error: ')]


def summary_values(logdir: str) -> dict:
  """{tag: [(step, Summary.Value)]} of every event file directly in logdir."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=import-outside-toplevel
  found = {}
  for path in sorted(glob.glob(os.path.join(logdir, '*tfevents*'))):
    for record in tf.data.TFRecordDataset(path):
      event = event_pb2.Event.FromString(record.numpy())
      for value in event.summary.value:
        found.setdefault(value.tag, []).append((event.step, value))
  return found
