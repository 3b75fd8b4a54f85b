"""The manifests in deploy/: the environment a TFJob and a Vertex AI job give
each replica is accepted by distloop and maps to the right role. Nothing is
deployed: the files are parsed, each replica's TF_CONFIG or CLUSTER_SPEC is
built as the job manager builds it, and main.py checks the replica's command
with it (--print_config: flags, config and cluster, no TensorFlow)."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests import runner
from trainer.cluster import tf_config

DEPLOY = os.path.join(runner.REPO, 'deploy')


def load(name):
  with open(os.path.join(DEPLOY, name), encoding='utf-8') as f:
    return yaml.safe_load(f)


def accepted(args, env):
  """main.py's verdict on a replica's command and environment."""
  argv = [a if not a.startswith('--model_dir=') else '--model_dir=/tmp/x'
          for a in args]
  result = subprocess.run(
      [sys.executable, runner.MAIN, *argv, '--print_config'],
      cwd=runner.REPO, capture_output=True, text=True, timeout=60,
      env={**os.environ, **env}, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  return result


@pytest.mark.parametrize('manifest, expected', [
    ('tfjob-resnet.yaml', ['chief', 'worker', 'worker', 'worker',
                           'evaluator']),
    ('tfjob-parameter-server.yaml', ['chief', *['worker'] * 4, 'ps', 'ps',
                                     'evaluator']),
])
def test_every_tfjob_replica_is_accepted_with_its_role(manifest, expected):
  job = load(manifest)
  name, namespace = job['metadata']['name'], job['metadata']['namespace']
  specs = job['spec']['tfReplicaSpecs']
  # The operator: lower-case types, services per replica, the evaluator
  # outside "cluster", an "environment" key.
  cluster = {kind.lower(): [f'{name}-{kind.lower()}-{i}.{namespace}.svc:2222'
                            for i in range(spec['replicas'])]
             for kind, spec in specs.items() if kind != 'Evaluator'}
  roles = []
  for kind, spec in specs.items():
    (container,) = spec['template']['spec']['containers']
    assert container['command'] == ['python', 'main.py']
    code = int(next(a for a in container['args']
                    if a.startswith('--retryable_exit_code='))
               .split('=')[1])
    assert spec['restartPolicy'] == 'ExitCode' and 128 <= code <= 255
    for index in range(spec['replicas']):
      config = json.dumps({'cluster': cluster, 'environment': 'cloud',
                           'task': {'type': kind.lower(), 'index': index}})
      strategy = next(a for a in container['args']
                      if a.startswith('--strategy=')).split('=')[1]
      roles.append(tf_config.role(tf_config.parse(config, strategy=strategy)))
      accepted(container['args'], {'TF_CONFIG': config})
  assert roles == expected


def test_every_vertex_replica_is_accepted_with_its_role():
  pools = load('vertex-resnet.yaml')['workerPoolSpecs']
  cluster = {f'workerpool{p}': [f'cmle-training-workerpool{p}-{i}:2222'
                                for i in range(pool['replicaCount'])]
             for p, pool in enumerate(pools)}
  roles = []
  for p, pool in enumerate(pools):
    for index in range(pool['replicaCount']):
      spec = json.dumps({'cluster': cluster, 'environment': 'cloud',
                         'task': {'type': f'workerpool{p}', 'index': index}})
      environ = {'CLUSTER_SPEC': spec}
      roles.append(tf_config.role(tf_config.from_environ(environ)))
      accepted(pool['containerSpec']['args'], {'CLUSTER_SPEC': spec,
                                               'TF_CONFIG': ''})
  assert roles == ['chief', 'worker', 'worker', 'worker']
