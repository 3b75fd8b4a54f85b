"""TF_CONFIG validation: each mistake is one line naming the field."""

import json
import logging

import pytest

from trainer.cluster import tf_config
from trainer.errors import UserError


def _config(cluster=None, task_type='worker', index=0, **extra):
  if cluster is None:
    cluster = {'worker': ['10.0.0.1:2222', '10.0.0.2:2222']}
  return dict(cluster=cluster, task={'type': task_type, 'index': index},
              **extra)


def _error(fn, *args) -> str:
  with pytest.raises(UserError) as e:
    fn(*args)
  message = str(e.value)
  assert '\n' not in message
  return message


def test_valid_config_passes_through_unchanged():
  config = _config(index=1, environment='cloud')
  assert tf_config.parse(json.dumps(config)) == config


def test_string_index_is_accepted_as_tensorflow_does():
  assert tf_config.validate(_config(index='1'))['task']['index'] == 1


def test_from_environ_reads_tf_config():
  raw = json.dumps(_config(index=1))
  assert tf_config.task_name(
      tf_config.from_environ({'TF_CONFIG': raw})) == 'worker:1'


@pytest.mark.parametrize('environ', [{}, {'TF_CONFIG': '  '}])
def test_missing_tf_config_says_how_to_provide_one(environ):
  message = _error(tf_config.from_environ, environ)
  assert 'needs the TF_CONFIG environment variable' in message
  assert '--worker_hosts=' in message and 'trainer.cluster.launch' in message


def test_invalid_json_names_tf_config_and_shows_the_value():
  message = _error(tf_config.parse, '{"cluster": ')
  assert message.startswith('TF_CONFIG is not valid JSON')
  assert "value: '{\"cluster\": '" in message


@pytest.mark.parametrize('config, expected', [
    ([1, 2], 'TF_CONFIG must be a JSON object, got [1, 2]'),
    ({'task': {'type': 'worker', 'index': 0}}, 'TF_CONFIG has no "cluster"'),
    (_config(cluster={}), 'TF_CONFIG cluster={} must be an object of job '
     'name -> list of "host:port"'),
    (_config(cluster={'worker': 'h:1,h:2'}),
     'TF_CONFIG cluster.worker="h:1,h:2" must be a non-empty list of '
     '"host:port" strings'),
    (_config(cluster={'worker': []}), 'TF_CONFIG cluster.worker=[] must be'),
    (_config(cluster={'worker': ['h:1'], 'ps': ['h:2']}),
     'TF_CONFIG cluster.ps: MultiWorkerMirroredStrategy does not use "ps" '
     'tasks (only "chief" and "worker"); remove cluster.ps'),
    (_config(cluster={'worker': ['h:1'], 'evaluator': ['h:2']}),
     'does not use "evaluator" tasks'),
    (_config(cluster={'chief': ['a:1', 'b:1'], 'worker': ['c:1']}),
     'TF_CONFIG cluster.chief has 2 entries; a cluster has at most one chief'),
])
def test_malformed_cluster_is_an_error(config, expected):
  assert expected in _error(tf_config.validate, config)


@pytest.mark.parametrize('config, expected', [
    ({'cluster': {'worker': ['h:1']}, 'task': None},
     'TF_CONFIG task=null must be an object {"type": "worker", "index": I}'),
    (_config(task_type='wroker'), 'TF_CONFIG task.type="wroker" is not a job '
     'of the cluster; use one of: worker'),
    (_config(task_type='ps'), "TF_CONFIG task.type='ps': "
     'MultiWorkerMirroredStrategy does not use "ps" tasks'),
    (_config(index=2), 'TF_CONFIG task.index=2 is out of range: '
     'cluster.worker has 2 entries (0..1)'),
    (_config(index=-1), 'TF_CONFIG task.index=-1 is out of range'),
    (_config(index=None), 'TF_CONFIG task.index=null must be an integer in '
     '0..1 (cluster.worker has 2 entries)'),
    (_config(index=True), 'TF_CONFIG task.index=true must be an integer'),
    (_config(index='one'), 'TF_CONFIG task.index="one" must be an integer'),
])
def test_malformed_task_is_an_error(config, expected):
  assert expected in _error(tf_config.validate, config)


@pytest.mark.parametrize('address, expected', [
    ('10.0.0.2', "cluster.worker[1]='10.0.0.2' is not host:port"),
    (':2222', "cluster.worker[1]=':2222' is not host:port"),
    ('10.0.0.2:http', "has port 'http', not a number"),
    ('10.0.0.2:0', 'has port 0, outside 1..65535'),
    ('10.0.0.2:65536', 'has port 65536, outside 1..65535'),
    ('grpc://10.0.0.2:2222', 'must be host:port without a scheme'),
    ('10.0.0.1:2222', "TF_CONFIG cluster.worker[1]='10.0.0.1:2222' is also "
     'cluster.worker[0]; every task needs its own host:port'),
])
def test_bad_address_is_an_error(address, expected):
  config = _config(cluster={'worker': ['10.0.0.1:2222', address]})
  message = _error(tf_config.validate, config)
  assert message.startswith('TF_CONFIG ') and expected in message


def test_duplicate_address_across_jobs_is_an_error():
  config = _config(cluster={'chief': ['h:1'], 'worker': ['h:2', 'H:1']})
  assert "cluster.worker[1]='H:1' is also cluster.chief[0]" in _error(
      tf_config.validate, config)


def test_ipv6_address_is_accepted():
  tf_config.validate(_config(cluster={'worker': ['[::1]:1', '[::1]:2']}))


def test_loopback_among_other_hosts_warns(caplog):
  config = _config(cluster={'worker': ['localhost:2222', '10.0.0.2:2222']})
  with caplog.at_level(logging.WARNING):
    tf_config.validate(config)
  assert 'TF_CONFIG mixes loopback address(es) localhost:2222 with other ' \
         'hosts (10.0.0.2)' in caplog.text
  assert 'tensorflow#57372' in caplog.text


@pytest.mark.parametrize('workers', [
    ['localhost:1', '127.0.0.1:2', '[::1]:3'],  # One machine: fine.
    ['10.0.0.1:1', '10.0.0.2:1'],
])
def test_no_warning_without_mixed_loopback(workers, caplog):
  with caplog.at_level(logging.WARNING):
    tf_config.validate(_config(cluster={'worker': workers}))
  assert 'loopback' not in caplog.text


def test_from_flags_builds_a_valid_tf_config():
  raw = tf_config.from_flags('10.0.0.1:2222, 10.0.0.2:2222', 1)
  config = tf_config.parse(raw)
  assert config == {'cluster': {'worker': ['10.0.0.1:2222', '10.0.0.2:2222']},
                    'task': {'type': 'worker', 'index': 1}}


@pytest.mark.parametrize('hosts, index, expected', [
    ('', 0, "flag --worker_hosts='' has an empty entry"),
    ('a:1,,b:1', 0, "flag --worker_hosts='a:1,,b:1' has an empty entry"),
    ('a:1,b', 0, "flag --worker_hosts entry 1='b' is not host:port"),
    ('a:1,a:1', 0, "flag --worker_hosts entry 1='a:1' is also entry 0"),
    ('a:1,b:99999', 0, 'entry 1=\'b:99999\' has port 99999, outside'),
    ('a:1,b:1', None, 'flag --task_index is required with --worker_hosts: '
     "give this process's position in it (0..1)"),
    ('a:1,b:1', 2, 'flag --task_index=2 is out of range: --worker_hosts has '
     '2 entries (0..1)'),
])
def test_from_flags_errors_name_the_flag(hosts, index, expected):
  assert expected in _error(tf_config.from_flags, hosts, index)


def test_from_flags_warns_on_mixed_loopback(caplog):
  with caplog.at_level(logging.WARNING):
    tf_config.from_flags('localhost:1,10.0.0.2:1', 0)
  assert 'flag --worker_hosts mixes loopback' in caplog.text


def test_set_from_flags_sets_tf_config():
  environ = {}
  tf_config.set_from_flags('a:1,b:1', 1, strategy='multi_worker_mirrored',
                           environ=environ)
  assert tf_config.task_name(tf_config.from_environ(environ)) == 'worker:1'


def test_set_from_flags_without_flags_leaves_tf_config_alone():
  environ = {'TF_CONFIG': 'as set by the cluster manager'}
  tf_config.set_from_flags('', None, strategy='default', environ=environ)
  assert environ == {'TF_CONFIG': 'as set by the cluster manager'}


@pytest.mark.parametrize('hosts, index, strategy, environ, expected', [
    ('', 1, 'multi_worker_mirrored', {},
     'flag --task_index=1 needs --worker_hosts=HOST:PORT,...'),
    ('a:1,b:1', 0, 'mirrored', {}, 'flag --worker_hosts needs '
     '--strategy=multi_worker_mirrored (got --strategy=mirrored)'),
    ('a:1,b:1', 0, 'multi_worker_mirrored', {'TF_CONFIG': '{}'},
     'flag --worker_hosts and the TF_CONFIG environment variable both '
     'describe the cluster'),
    ('a:1,b:1', None, 'multi_worker_mirrored', {},
     'flag --task_index is required with --worker_hosts'),
])
def test_set_from_flags_errors(hosts, index, strategy, environ, expected):
  message = _error(lambda: tf_config.set_from_flags(
      hosts, index, strategy=strategy, environ=environ))
  assert expected in message
  assert 'TF_CONFIG' not in environ or environ['TF_CONFIG'] == '{}'


@pytest.mark.parametrize('cluster, task_type, index, chief', [
    ({'worker': ['a:1', 'b:1']}, 'worker', 0, True),
    ({'worker': ['a:1', 'b:1']}, 'worker', 1, False),
    ({'chief': ['c:1'], 'worker': ['a:1']}, 'chief', 0, True),
    ({'chief': ['c:1'], 'worker': ['a:1']}, 'worker', 0, False),
])
def test_is_chief(cluster, task_type, index, chief):
  config = tf_config.validate(_config(cluster, task_type, index))
  assert tf_config.is_chief(config) is chief


def test_task_name_and_num_workers():
  config = tf_config.validate(_config({'chief': ['c:1'],
                                       'worker': ['a:1', 'b:1']}, 'worker', 1))
  assert tf_config.task_name(config) == 'worker:1'
  assert tf_config.num_workers(config) == 3


def test_tfjob_and_vertex_conventions_are_accepted_and_map_to_roles():
  # Kubeflow's TFJob: lower-case types, "environment", no evaluator in
  # cluster although a task is the evaluator.
  cluster = {'chief': ['job-chief-0.ns.svc:2222'],
             'worker': ['job-worker-0.ns.svc:2222', 'job-worker-1.ns.svc:2222']}
  roles = []
  for task in ({'type': 'chief', 'index': 0}, {'type': 'worker', 'index': 1},
               {'type': 'evaluator', 'index': 0}):
    config = tf_config.validate({'cluster': cluster, 'task': task,
                                 'environment': 'cloud'})
    roles.append(tf_config.role(config))
  assert roles == ['chief', 'worker', 'evaluator']
  # Vertex AI's CLUSTER_SPEC, when TF_CONFIG is not set: translated for
  # TensorFlow, which reads TF_CONFIG.
  environ = {'CLUSTER_SPEC': json.dumps({
      'cluster': {'workerpool0': ['cmle-0:2222'],
                  'workerpool1': ['cmle-1:2222', 'cmle-2:2222']},
      'environment': 'cloud', 'task': {'type': 'workerpool1', 'index': 1}})}
  config = tf_config.from_environ(environ)
  assert tf_config.task_name(config) == 'worker:1'
  assert json.loads(environ['TF_CONFIG'])['cluster']['chief'] == ['cmle-0:2222']
  environ = {'CLUSTER_SPEC': '{"cluster": {"workerpool7": ["a:1"]}, '
                             '"task": {"type": "workerpool7", "index": 0}}'}
  assert 'cluster.workerpool7 is not a Vertex AI worker pool' in _error(
      tf_config.from_environ, environ)


def test_a_public_address_is_warned_about_in_one_line(caplog):
  tf_config.validate(_config(cluster={'worker': ['8.8.8.8:2222',
                                                 '10.0.0.2:2222']}))
  (line,) = [r.getMessage() for r in caplog.records
             if 'public address' in r.getMessage()]
  assert '8.8.8.8:2222' in line and '10.0.0.2' not in line
  caplog.clear()
  tf_config.validate(_config(cluster={'worker': ['10.0.0.1:1', 'host:2']}))
  assert not [r for r in caplog.records if 'public' in r.getMessage()]


PS_CLUSTER = {'chief': ['10.0.0.1:2222'],
              'worker': ['10.0.0.2:2222', '10.0.0.3:2222'],
              'ps': ['10.0.0.4:2222']}


def test_a_parameter_server_cluster_maps_every_task_to_its_role():
  roles = []
  for task_type, index in (('chief', 0), ('worker', 1), ('ps', 0),
                           ('evaluator', 0)):
    config = tf_config.validate(_config(PS_CLUSTER, task_type, index),
                                strategy='parameter_server')
    roles.append(tf_config.role(config))
  assert roles == ['chief', 'worker', 'ps', 'evaluator']
  # Vertex AI's third worker pool is the ps tasks.
  environ = {'CLUSTER_SPEC': json.dumps({
      'cluster': {'workerpool0': ['c:1'], 'workerpool1': ['w:1'],
                  'workerpool2': ['p:1']},
      'task': {'type': 'workerpool2', 'index': 0}})}
  config = tf_config.from_environ(environ, strategy='parameter_server')
  assert tf_config.task_name(config) == 'ps:0'


@pytest.mark.parametrize('missing', ['chief', 'worker', 'ps'])
def test_a_parameter_server_cluster_needs_chief_workers_and_ps(missing):
  cluster = {job: a for job, a in PS_CLUSTER.items() if job != missing}
  task_type = 'worker' if missing != 'worker' else 'chief'
  message = _error(lambda: tf_config.validate(
      _config(cluster, task_type), strategy='parameter_server'))
  assert message.startswith(f'TF_CONFIG has no cluster.{missing}: '
                            'ParameterServerStrategy needs a chief')


def test_ps_tasks_under_multi_worker_mirrored_name_the_other_strategy():
  assert '--strategy=parameter_server' in _error(
      tf_config.validate, _config(PS_CLUSTER, 'ps'))
  assert '--strategy=parameter_server' in _error(
      tf_config.validate, _config(task_type='ps'))  # No cluster.ps at all.
  message = _error(lambda: tf_config.from_environ(
      {}, strategy='parameter_server'))
  assert message.startswith('--strategy=parameter_server needs the TF_CONFIG '
                            'environment variable')
  assert '--num_ps=M' in message


VERTEX_WORKERS = {'workerpool0': ['h0:1'], 'workerpool1': ['h1:1']}


@pytest.mark.parametrize('environ, evaluator', [
    ({}, False),
    ({'TF_CONFIG': ''}, False),
    ({'TF_CONFIG': json.dumps({'cluster': {'chief': ['h0:1']},
                               'task': {'type': 'chief', 'index': 0}})},
     False),
    # The evaluator beside a chief that trains under one process's strategy.
    ({'TF_CONFIG': json.dumps({'cluster': {'chief': ['h0:1']},
                               'task': {'type': 'evaluator', 'index': 0}})},
     True),
    ({'TF_CONFIG': json.dumps({'task': {'type': 'evaluator'}})}, True),
    ({'CLUSTER_SPEC': json.dumps({'cluster': VERTEX_WORKERS, 'task': {
        'type': 'workerpool3', 'index': 0}})}, True),
], ids=['unset', 'empty', 'one_task', 'evaluator', 'evaluator_alone',
        'vertex_evaluator'])
def test_one_process_strategies_know_the_evaluator_task(environ, evaluator):
  assert tf_config.check_one_process('mirrored', environ) is evaluator


@pytest.mark.parametrize('environ, name', [
    ({'TF_CONFIG': json.dumps({'cluster': {'worker': ['h0:1', 'h1:1']},
                               'task': {'type': 'worker', 'index': 1}})},
     'TF_CONFIG'),
    ({'CLUSTER_SPEC': json.dumps({'cluster': VERTEX_WORKERS, 'task': {
        'type': 'workerpool1', 'index': 0}})}, 'CLUSTER_SPEC'),
], ids=['tf_config', 'vertex'])
def test_one_process_training_in_a_cluster_is_refused(environ, name):
  with pytest.raises(UserError) as error:
    tf_config.check_one_process('default', environ)
  assert str(error.value) == (
      f'{name} names a cluster of 2 tasks, but --strategy=default trains in '
      'this process alone: each task would train a model of its own into one '
      '--model_dir; pass --strategy=multi_worker_mirrored (or '
      f'parameter_server), or unset {name}')
