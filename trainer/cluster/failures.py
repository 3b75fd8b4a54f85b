"""What a cluster failure looks like from one worker: one line, not a
multi-screen traceback.

MultiWorkerMirroredStrategy can neither shrink nor take a restarted worker
back into a running cluster, so a worker that did not join, or died, stops
the others. `startup_error` (the cluster did not form) and `cluster_error`
(a TF error raised mid-run because a peer failed) turn TensorFlow's errors
into a `ClusterError` naming the peer, which main.py prints as one
`error: ` line before exiting with ClusterError.EXIT_CODE, so that a job
manager restarts every worker and training resumes from the newest
checkpoint.
"""

import concurrent.futures
import re
import socket

import tensorflow as tf

from trainer.cluster import tf_config

# The validated TF_CONFIG of the MultiWorkerMirroredStrategy built in this
# process (None: none was), for naming the failed peer in `cluster_error`.
_cluster = None


def watch(config: dict) -> None:
  """Remembers this process's cluster (set when its strategy is built)."""
  global _cluster
  _cluster = config


class ClusterError(Exception):
  """A worker did not join the cluster, or stopped while the others ran.

  Not a mistake in this worker's input (that is a UserError, status 2):
  nothing needs editing, but this worker cannot go on alone -
  MultiWorkerMirroredStrategy can neither shrink nor take a restarted worker
  back into a running cluster. main.py prints the message as one `error: `
  line and exits with EXIT_CODE, so that a job manager restarts every worker;
  training then resumes from the newest checkpoint.
  """

  # EX_TEMPFAIL of sysexits.h: a temporary failure, which a retry may fix.
  EXIT_CODE = 75


def startup_error(error, config: dict, cluster_timeout: float):
  """The ClusterError for a TF error while the cluster was forming."""
  tasks = _failed_tasks(str(error), config) or unreachable_peers(config)
  if isinstance(error, tf.errors.DeadlineExceededError):
    what = (f'{describe(tasks, config)} did not join the cluster' if tasks
            else f'the cluster of {tf_config.num_workers(config)} workers did '
            'not form')
    return ClusterError(
        f'{what} within --cluster_timeout={cluster_timeout:g}s; start every '
        'task of TF_CONFIG\'s cluster, check that this host can reach its '
        'address, or raise --cluster_timeout')
  who = describe(tasks, config) or 'a worker'
  return ClusterError(
      f'{who} failed while the cluster was forming ({_reason(error)}); '
      'restart every worker')


def cluster_error(error: BaseException):
  """The ClusterError that `error`, raised in this process, stands for.

  Args:
    error: any exception that ended the run.
  Returns:
    `error` itself when it is a ClusterError; for a TensorFlow error that a
    peer's failure caused in a multi-worker run, a ClusterError naming the
    peer (from TF's message, else the peers that no longer accept
    connections); otherwise None (a bug, to be shown with its traceback).
  """
  if isinstance(error, ClusterError):
    return error
  config = _cluster
  if config is None:
    return None
  op_error = next((e for e in _chain(error)
                   if isinstance(e, _PEER_FAILURE_ERRORS)), None)
  if op_error is None:
    return None
  message = str(op_error)
  tasks = _failed_tasks(message, config)
  if not tasks:
    if not any(p in message.lower() for p in _PEER_FAILURE_PHRASES):
      return None
    tasks = unreachable_peers(config)
  who = describe(tasks, config) or 'another worker'
  restart = ('it and the chief' if 'ps' in config['cluster'] else
             'every worker')
  return ClusterError(
      f'{who} stopped during the run ({_reason(op_error)}); '
      f'{tf_config.task_name(config)} cannot go on without it: restart '
      f'{restart}, training resumes from the newest checkpoint in '
      '--model_dir')


# What a peer's failure raises in the others (Unavailable: gone; Aborted /
# FailedPrecondition: restarted; Cancelled, Internal, Unknown: collectives
# aborted midway; DeadlineExceeded: a barrier timed out).
_PEER_FAILURE_ERRORS = (
    tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
    tf.errors.AbortedError, tf.errors.CancelledError,
    tf.errors.FailedPreconditionError, tf.errors.InternalError,
    tf.errors.UnknownError)
_PEER_FAILURE_PHRASES = (
    'heartbeat', 'unhealthy', 'collective ops is aborted', 'connection reset',
    'socket closed', 'connection refused', 'failed to connect',
    'coordination service', 'has restarted', 'disconnected')
_TASK = re.compile(r'/job:(\w+)(?:/replica:\d+)?/task:(\d+)')
# Where TF's messages list the failed tasks, one per line after the phrase
# (coordination service), or name the one that did not answer an RPC.
_LIST_MARKERS = ('stopped sending heartbeats):', 'timed out task names:')


def _failed_tasks(message: str, config: dict) -> list:
  """Tasks of `config`'s cluster that TF's `message` names as failed.

  In order of trust: the coordination service's lists ("The following tasks
  are unhealthy (stopped sending heartbeats):", "Some timed out task
  names:"), then the remote target of a failed RPC, then any other task
  the message mentions. Never this task itself.
  """
  me = tf_config.task_name(config)

  def known(found):
    names = []
    for job, index in found:
      name = f'{job}:{int(index)}'
      if (name != me and name not in names and
          int(index) < len(config['cluster'].get(job, ()))):
        names.append(name)
    return names

  for marker in _LIST_MARKERS:
    at = message.find(marker)
    if at >= 0:
      listed = []
      for line in message[at + len(marker):].splitlines()[1:]:
        match = _TASK.fullmatch(line.strip())
        if not match:
          break
        listed.append(match.groups())
      if known(listed):
        return known(listed)
  target = re.search(r'remote target ' + _TASK.pattern, message)
  if target and known([target.groups()]):
    return known([target.groups()])
  return known(_TASK.findall(message))


def unreachable_peers(config: dict) -> list:
  """The other tasks whose TF_CONFIG address refuses a TCP connection.

  Probed in parallel, 2 s each, so that a large cluster of silent hosts
  does not delay the error.
  """
  me = tf_config.task_name(config)
  peers = [(f'{job}:{index}', address)
           for job, addresses in config['cluster'].items()
           for index, address in enumerate(addresses)
           if f'{job}:{index}' != me]

  def refuses(address):
    host, _, port = address.rpartition(':')
    try:
      socket.create_connection((host.strip('[]'), int(port)),
                               timeout=2).close()
      return False
    except (OSError, ValueError):
      return True

  if not peers:
    return []
  with concurrent.futures.ThreadPoolExecutor(min(32, len(peers))) as pool:
    down = list(pool.map(refuses, [address for _, address in peers]))
  return [name for (name, _), is_down in zip(peers, down) if is_down]


def describe(tasks, config: dict) -> str:
  """'worker:1 (10.0.0.2:2222), worker:2 (...)'."""
  cluster = config['cluster']
  parts = []
  for name in tasks:
    job, _, index = name.partition(':')
    parts.append(f'{name} ({cluster[job][int(index)]})')
  return ', '.join(parts)


def _reason(error) -> str:
  text = str(error).lower()
  if 'heartbeat' in text:
    why = 'stopped sending heartbeats'
  elif any(p in text for p in ('connection reset', 'socket closed',
                               'connection refused', 'failed to connect')):
    why = 'connection lost'
  elif 'timed out' in text or 'deadline' in text:
    why = 'timed out'
  else:
    why = 'collectives aborted'
  return f'{type(error).__name__}: {why}'


def _chain(error):
  """error, its __cause__ and __context__, recursively, each once."""
  seen, todo = [], [error]
  while todo:
    e = todo.pop(0)
    if e is None or any(e is s for s in seen):
      continue
    seen.append(e)
    todo += [e.__cause__, e.__context__]
  return seen
