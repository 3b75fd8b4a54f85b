"""TF_CONFIG for the multi-process strategies, checked before any strategy.

Job managers write it (Kubeflow's TFJob: lower-case replica types, an
"environment" key, the evaluator outside "cluster"; Vertex AI: also
CLUSTER_SPEC, whose "workerpool0..3" map to chief, worker, ps and evaluator,
and which is translated to TF_CONFIG when TF_CONFIG is not set); both pass
through the same checks.

A wrong TF_CONFIG does not fail in TensorFlow: the workers wait for each
other forever (tensorflow#39922, #60706), or a `localhost` address in a
multi-host cluster makes a worker dial itself (tensorflow#57372). Every
mistake found here is instead a one-line `UserError` naming the field.

  config = tf_config.from_environ()     # or parse(raw) / validate(dict)
  config = tf_config.from_environ(strategy='parameter_server')  # + ps tasks
  tf_config.task_name(config)           # 'worker:1'
  tf_config.is_chief(config)            # chief, or worker 0 without a chief
  os.environ['TF_CONFIG'] = tf_config.from_flags('h1:2222,h2:2222', 1)
  tf_config.set_from_flags(FLAGS.worker_hosts, FLAGS.task_index,
                           strategy=FLAGS.strategy)  # The same, for main.py.

A validated TF_CONFIG is a plain dict {"cluster": {job: [address, ...]},
"task": {"type": job, "index": int}} (other top-level keys are kept), so it
can be passed back to TensorFlow as JSON unchanged.
"""

import ipaddress
import json
import os

from absl import logging

from trainer.errors import UserError

# The only jobs MultiWorkerMirroredStrategy runs: "ps" belongs to
# ParameterServerStrategy and "evaluator" is a side-car outside the cluster.
JOBS = ('chief', 'worker')
# ParameterServerStrategy's: the chief (the coordinator), workers, ps tasks.
PS_JOBS = ('chief', 'worker', 'ps')
_PS_EXAMPLE = ('{"cluster": {"chief": ["host0:2222"], "worker": '
               '["host1:2222", "host2:2222"], "ps": ["host3:2222"]}, '
               '"task": {"type": "ps", "index": 0}}')
_EXAMPLE = ('{"cluster": {"worker": ["host1:2222", "host2:2222"]}, '
            '"task": {"type": "worker", "index": 0}}')
_LOOPBACK_NAMES = ('localhost', 'ip6-localhost', '::1', '[::1]')


# Vertex AI's worker pools, in order (CLUSTER_SPEC).
WORKER_POOLS = ('chief', 'worker', 'ps', 'evaluator')
TASK_VARIABLES = ('TF_CONFIG', 'CLUSTER_SPEC')  # Either names this task.


def from_cluster_spec(raw: str) -> dict:
  """TF_CONFIG (a dict) from Vertex AI's CLUSTER_SPEC JSON.

  workerpool0 is the chief, workerpool1 the workers, workerpool2 the ps
  tasks and workerpool3 the evaluator (which, as in TF_CONFIG, stays outside
  "cluster").
  """
  try:
    spec = json.loads(raw)
  except json.JSONDecodeError as e:
    raise UserError(f'CLUSTER_SPEC is not valid JSON ({e}); value: '
                    f'{raw!r}') from e
  if not isinstance(spec, dict) or not isinstance(spec.get('cluster'), dict):
    raise UserError(f'CLUSTER_SPEC must be an object with "cluster" '
                    '{"workerpool0": [...], ...} and "task"; value: '
                    f'{raw!r}')
  names = {f'workerpool{i}': job for i, job in enumerate(WORKER_POOLS)}
  cluster = {}
  for pool, addresses in spec['cluster'].items():
    if pool not in names:
      raise UserError(f'CLUSTER_SPEC cluster.{pool} is not a Vertex AI worker '
                      f'pool; valid: {", ".join(names)}')
    if names[pool] != 'evaluator':
      cluster[names[pool]] = addresses
  task = dict(spec.get('task') or {})
  if task.get('type') not in names:
    raise UserError(f'CLUSTER_SPEC task.type={json.dumps(task.get("type"))} '
                    f'is not a worker pool; valid: {", ".join(names)}')
  task['type'] = names[task['type']]
  return dict(spec, cluster=cluster, task=task)


def from_environ(environ=None, *,
                 strategy: str = 'multi_worker_mirrored') -> dict:
  """Reads and validates the TF_CONFIG environment variable.

  Args:
    environ: the environment to read (default: os.environ).
    strategy: the --strategy it is for: 'multi_worker_mirrored' or
      'parameter_server' (whose cluster has a chief, workers and ps tasks).
  Returns:
    The validated TF_CONFIG (see `validate`).
  Raises:
    UserError: TF_CONFIG is unset, empty or invalid.
  """
  environ = os.environ if environ is None else environ
  raw = environ.get('TF_CONFIG', '')
  if not raw.strip() and environ.get('CLUSTER_SPEC', '').strip():
    config = validate(from_cluster_spec(environ['CLUSTER_SPEC']),
                      strategy=strategy)
    environ['TF_CONFIG'] = json.dumps(config)  # What TensorFlow reads.
    return config
  if not raw.strip() and strategy == 'parameter_server':
    raise UserError(
        '--strategy=parameter_server needs the TF_CONFIG environment '
        f'variable (e.g. {_PS_EXAMPLE}, the same cluster on every task); on '
        'one machine run python -m trainer.cluster.launch --num_workers=N '
        '--num_ps=M -- ARGS')
  if not raw.strip():
    raise UserError(
        '--strategy=multi_worker_mirrored needs the TF_CONFIG environment '
        f'variable (e.g. {_EXAMPLE}), or --worker_hosts=HOST:PORT,... '
        '--task_index=I; on one machine run python -m trainer.cluster.launch '
        '--num_workers=N -- ARGS')
  return parse(raw, strategy=strategy)


def parse(raw: str, *, strategy: str = 'multi_worker_mirrored') -> dict:
  """Parses a TF_CONFIG JSON string and validates it (see `validate`)."""
  try:
    tf_config = json.loads(raw)
  except json.JSONDecodeError as e:
    raise UserError(f'TF_CONFIG is not valid JSON ({e}); value: {raw!r}; '
                    f'expected e.g. {_EXAMPLE}') from e
  return validate(tf_config, strategy=strategy)


def validate(tf_config, *, strategy: str = 'multi_worker_mirrored') -> dict:
  """Checks a decoded TF_CONFIG for MultiWorkerMirroredStrategy or, with
  strategy='parameter_server', for ParameterServerStrategy.

  Rules: an object with "cluster" (job -> non-empty list of "host:port", jobs
  "chief" (at most one entry) and "worker" only; for parameter_server
  exactly one "chief", "worker" and "ps") and "task" ({"type": a job of the
  cluster or "evaluator", "index": an int in range}); ports in 1..65535; no
  address twice. Warns of loopback addresses mixed with other hosts.

  Args:
    tf_config: the decoded JSON.
    strategy: 'multi_worker_mirrored' or 'parameter_server'.
  Returns:
    A copy with task.index as an int (TensorFlow also accepts "1").
  Raises:
    UserError: naming the first field that breaks a rule, e.g.
      `TF_CONFIG task.index=2 is out of range: cluster.worker has 2 entries
      (0..1)`.
  """
  if not isinstance(tf_config, dict):
    raise UserError(f'TF_CONFIG must be a JSON object, got '
                    f'{json.dumps(tf_config)}; expected e.g. {_EXAMPLE}')
  jobs = PS_JOBS if strategy == 'parameter_server' else JOBS
  cluster = _validate_cluster(tf_config.get('cluster'), jobs)
  task = _validate_task(tf_config.get('task'), cluster, jobs)
  _check_addresses([(f'cluster.{job}[{i}]', address)
                    for job, addresses in cluster.items()
                    for i, address in enumerate(addresses)], 'TF_CONFIG ')
  addresses = [a for addresses in cluster.values() for a in addresses]
  _warn_on_mixed_loopback(addresses, 'TF_CONFIG')
  warn_on_public(addresses, 'TF_CONFIG')
  return dict(tf_config, cluster=cluster, task=task)


def role(tf_config: dict) -> str:
  """'chief' (or worker 0 without one), 'worker', 'ps' or 'evaluator'."""
  if tf_config['task']['type'] in ('evaluator', 'ps'):
    return tf_config['task']['type']
  return 'chief' if is_chief(tf_config) else 'worker'


def warn_on_public(addresses, source: str) -> None:
  """One warning line when an address is a public IP: TensorFlow's servers
  run any graph sent to them, with this process's rights (docs/cluster.md,
  "Who can reach the cluster")."""
  public = []
  for address in addresses:
    host = address.rpartition(':')[0].strip('[]')
    try:
      if ipaddress.ip_address(host).is_global:
        public.append(address)
    except ValueError:
      pass  # A host name: not resolved here.
  if public:
    logging.warning(
        '%s has public address(es) %s: anyone who reaches these ports can run '
        'graphs in this process; keep cluster traffic on a private network '
        'or behind a firewall (docs/cluster.md)', source, ', '.join(public))


def from_flags(worker_hosts: str, task_index) -> str:
  """TF_CONFIG JSON for `--worker_hosts=h1:p,h2:p --task_index=i`.

  For users without a cluster manager that writes TF_CONFIG: every worker
  gets the same --worker_hosts and its own --task_index; worker 0 is chief.

  Args:
    worker_hosts: comma-separated host:port of every worker, in task order.
    task_index: this process's position in worker_hosts (None: not given).
  Returns:
    The TF_CONFIG JSON string, validated.
  Raises:
    UserError: naming --worker_hosts or --task_index.
  """
  hosts = [h.strip() for h in worker_hosts.split(',')]
  if not worker_hosts.strip() or not all(hosts):
    raise UserError(f'flag --worker_hosts={worker_hosts!r} has an empty '
                    'entry; give every worker\'s host:port, comma-separated, '
                    'e.g. --worker_hosts=10.0.0.1:2222,10.0.0.2:2222')
  _check_addresses([(f'entry {i}', h) for i, h in enumerate(hosts)],
                   'flag --worker_hosts ')
  if task_index is None:
    raise UserError(f'flag --task_index is required with --worker_hosts: '
                    f'give this process\'s position in it (0..'
                    f'{len(hosts) - 1}), a different one on every worker')
  if not 0 <= task_index < len(hosts):
    raise UserError(f'flag --task_index={task_index} is out of range: '
                    f'--worker_hosts has {len(hosts)} entries '
                    f'(0..{len(hosts) - 1})')
  _warn_on_mixed_loopback(hosts, 'flag --worker_hosts')
  warn_on_public(hosts, 'flag --worker_hosts')
  return json.dumps({'cluster': {'worker': hosts},
                     'task': {'type': 'worker', 'index': task_index}})


def set_from_flags(worker_hosts: str, task_index, *, strategy: str,
                   environ=None) -> None:
  """Sets TF_CONFIG from main.py's --worker_hosts/--task_index, if given.

  Args:
    worker_hosts: --worker_hosts ('' when not given).
    task_index: --task_index (None when not given).
    strategy: --strategy; the flags need 'multi_worker_mirrored'.
    environ: the environment to set TF_CONFIG in (default: os.environ).
  Raises:
    UserError: the flags are incomplete, invalid, used with another
      strategy, or given while TF_CONFIG is set too.
  """
  environ = os.environ if environ is None else environ
  if not worker_hosts:
    if task_index is not None:
      raise UserError(f'flag --task_index={task_index} needs --worker_hosts='
                      'HOST:PORT,... (every worker\'s address, in order)')
    return
  if strategy != 'multi_worker_mirrored':
    raise UserError(f'flag --worker_hosts needs --strategy='
                    f'multi_worker_mirrored (got --strategy={strategy}); '
                    'pass it, or drop --worker_hosts')
  if environ.get('TF_CONFIG', '').strip():
    raise UserError('flag --worker_hosts and the TF_CONFIG environment '
                    'variable both describe the cluster; unset TF_CONFIG or '
                    'drop --worker_hosts/--task_index')
  environ['TF_CONFIG'] = from_flags(worker_hosts, task_index)


def tpu_address(tpu: str) -> tuple[str, int]:
  """(host, port) of --tpu=grpc://HOST:PORT; a UserError if malformed."""
  host, _, port = tpu[len('grpc://'):].rpartition(':')
  if not host or not port.isdigit():
    raise UserError(f'flag --tpu={tpu} is not of the form grpc://HOST:PORT')
  return host, int(port)


def check_one_process(strategy: str, environ=None) -> bool:
  """Whether TF_CONFIG (or CLUSTER_SPEC) names this process the evaluator,
  for training under a --strategy of one process; refuses a cluster of
  several tasks (TensorFlow ignores it there)."""
  environ = os.environ if environ is None else environ
  raw, spec = (environ.get(k, '').strip() for k in TASK_VARIABLES)
  name = TASK_VARIABLES[0 if raw or not spec else 1]
  try:
    config = from_cluster_spec(spec) if name != 'TF_CONFIG' else json.loads(raw)
    if config.get('task', {}).get('type') == 'evaluator':
      return True
    tasks = sum(len(v) for v in config['cluster'].values())
  except (ValueError, KeyError, TypeError, AttributeError, UserError):
    return False  # No cluster to run in: nothing for this strategy to ignore.
  if tasks > 1:
    raise UserError(
        f'{name} names a cluster of {tasks} tasks, but --strategy={strategy} '
        'trains in this process alone: each task would train a model of its '
        'own into one --model_dir; pass --strategy=multi_worker_mirrored (or '
        f'parameter_server), or unset {name}')
  return False


def task_name(tf_config: dict) -> str:
  """'type:index' of this task, e.g. 'worker:1'."""
  task = tf_config['task']
  return f'{task["type"]}:{task["index"]}'


def is_chief(tf_config: dict) -> bool:
  """True for the chief task, or worker 0 in a cluster without a chief."""
  task = tf_config['task']
  if 'chief' in tf_config['cluster']:
    return task['type'] == 'chief'
  return task['type'] == 'worker' and task['index'] == 0


def num_workers(tf_config: dict) -> int:
  """The number of training processes: the chief (if any) and the workers."""
  return sum(len(tf_config['cluster'].get(job, ())) for job in JOBS)


def _validate_cluster(cluster, jobs) -> dict:
  if cluster is None:
    raise UserError(f'TF_CONFIG has no "cluster"; expected e.g. {_EXAMPLE}')
  if not isinstance(cluster, dict) or not cluster:
    raise UserError(f'TF_CONFIG cluster={json.dumps(cluster)} must be an '
                    'object of job name -> list of "host:port", e.g. '
                    '{"worker": ["host1:2222", "host2:2222"]}')
  for job, addresses in cluster.items():
    if job not in jobs and job == 'ps':
      raise UserError(
          'TF_CONFIG cluster.ps: MultiWorkerMirroredStrategy does not use '
          '"ps" tasks (only "chief" and "worker"); remove cluster.ps, or '
          'pass --strategy=parameter_server')
    if job not in jobs:
      name, only = (('ParameterServerStrategy', '"chief", "worker" and "ps"')
                    if 'ps' in jobs else
                    ('MultiWorkerMirroredStrategy', '"chief" and "worker"'))
      raise UserError(f'TF_CONFIG cluster.{job}: {name} does not use "{job}" '
                      f'tasks (only {only}); remove cluster.{job}')
    if (not isinstance(addresses, list) or not addresses or
        not all(isinstance(a, str) for a in addresses)):
      raise UserError(f'TF_CONFIG cluster.{job}={json.dumps(addresses)} must '
                      'be a non-empty list of "host:port" strings, e.g. '
                      '["host1:2222", "host2:2222"]')
  if len(cluster.get('chief', ())) > 1:
    raise UserError(f'TF_CONFIG cluster.chief has {len(cluster["chief"])} '
                    'entries; a cluster has at most one chief: move the '
                    'others to cluster.worker')
  if 'ps' in jobs:
    for job in jobs:
      if job not in cluster:
        raise UserError(
            f'TF_CONFIG has no cluster.{job}: ParameterServerStrategy needs '
            'a chief (it runs the training loop), workers (they run the '
            'steps) and ps tasks (they hold the variables); e.g. '
            f'{_PS_EXAMPLE}')
  return cluster


def _validate_task(task, cluster: dict, jobs) -> dict:
  if not isinstance(task, dict):
    raise UserError(
        f'TF_CONFIG task={json.dumps(task)} must be an object '
        '{"type": "worker", "index": I} naming this process\'s place in '
        'the cluster')
  names = ', '.join(cluster)
  task_type = task.get('type')
  if task_type == 'evaluator':
    # Outside the cluster, as TF_CONFIG conventions and TFJob put it.
    return dict(task, index=task.get('index', 0))
  if task_type == 'ps' and 'ps' not in jobs:
    raise UserError(f'TF_CONFIG task.type={task_type!r}: '
                    f'MultiWorkerMirroredStrategy does not use "{task_type}" '
                    'tasks (only "chief" and "worker"); pass '
                    '--strategy=parameter_server for a ps task')
  if task_type not in cluster:
    raise UserError(f'TF_CONFIG task.type={json.dumps(task_type)} is not a '
                    f'job of the cluster; use one of: {names}')
  size = len(cluster[task_type])
  index = task.get('index')
  if isinstance(index, str) and index.strip().isdigit():
    index = int(index)  # TensorFlow itself accepts "index": "1".
  if not isinstance(index, int) or isinstance(index, bool):
    raise UserError(f'TF_CONFIG task.index={json.dumps(index)} must be an '
                    f'integer in 0..{size - 1} (cluster.{task_type} has '
                    f'{size} entries)')
  if not 0 <= index < size:
    raise UserError(f'TF_CONFIG task.index={index} is out of range: '
                    f'cluster.{task_type} has {size} entries (0..{size - 1})')
  return dict(task, index=index)


def _check_addresses(entries, prefix: str) -> None:
  """Raises for a malformed or repeated address; entries: (label, address)."""
  seen = {}
  for label, address in entries:
    rule = _address_rule(address)
    if rule:
      raise UserError(f'{prefix}{label}={address!r} {rule}')
    key = address.lower()
    if key in seen:
      raise UserError(f'{prefix}{label}={address!r} is also {seen[key]}; '
                      'every task needs its own host:port')
    seen[key] = label


def _address_rule(address: str):
  """The host:port rule `address` breaks, or None."""
  host, colon, port = address.rpartition(':')
  if '://' in address:
    return 'must be host:port without a scheme, e.g. "10.0.0.1:2222"'
  if not colon or not host or any(c.isspace() for c in address):
    return 'is not host:port; write e.g. "10.0.0.1:2222"'
  if not port.isdigit():
    return f'has port {port!r}, not a number; write e.g. "{host}:2222"'
  if not 1 <= int(port) <= 65535:
    return f'has port {int(port)}, outside 1..65535'
  return None


def _is_loopback(host: str) -> bool:
  host = host.lower()
  return host in _LOOPBACK_NAMES or host.startswith('127.')


def _warn_on_mixed_loopback(addresses, source: str) -> None:
  hosts = [a.rpartition(':')[0] for a in addresses]
  loopback = [a for a, h in zip(addresses, hosts) if _is_loopback(h)]
  others = sorted({h for h in hosts if not _is_loopback(h)})
  if loopback and others:
    logging.warning(
        '%s mixes loopback address(es) %s with other hosts (%s): a worker on '
        'another machine that dials a loopback address reaches itself and '
        'the job hangs (tensorflow#57372); use every host\'s network address',
        source, ', '.join(loopback), ', '.join(others))
