"""One training run in a model_dir at a time.

Two runs training into one model_dir (a job resubmitted while its first copy
still runs, one command started twice) would overwrite each other's
checkpoints, and the second one's start-up tidying (checkpointing.tidy)
would delete the first one's writes in flight. So the chief of a training
run holds an exclusive `flock` on the model_dir directory itself (no file is
added to it) from just before its first write until the run ends. The
kernel drops the lock when the process ends in any way, kill -9 included, so
a restarted run never finds a stale one. Readers (--mode=eval, export,
continuous_eval) take none.
"""

import fcntl
import os

from absl import logging

from trainer.errors import UserError

_held = {}  # {model_dir: the descriptor holding its lock}


def take(model_dir: str) -> None:
  """Locks `model_dir` (an existing directory) for this process.

  Raises:
    UserError: another process holds it (named when /proc/locks tells).
  """
  if model_dir in _held:
    return
  fd = os.open(model_dir, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    raise _in_use(model_dir) from None
  except OSError as e:  # A file system without locks (some network mounts).
    os.close(fd)
    logging.warning('cannot lock --model_dir=%s (%s); nothing stops a second '
                    'run from training into it at the same time', model_dir,
                    e.strerror)
    return
  _held[model_dir] = fd


def check_free(model_dir: str) -> None:
  """Refuses an existing `model_dir` that another run holds, taking nothing
  (main.py asks before importing TensorFlow, so a second run into a busy
  model_dir is told in a second; take() decides later).

  Raises:
    UserError: another process holds it.
  """
  if model_dir in _held or not os.path.isdir(model_dir):
    return
  fd = os.open(model_dir, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    raise _in_use(model_dir) from None
  except OSError:
    pass  # No locks here: take() warns.
  finally:
    os.close(fd)  # Drops the lock if it was taken.


def _in_use(model_dir: str) -> UserError:
  return UserError(
      f'flag --model_dir={model_dir!r} is in use by another training run '
      f'({_holder(model_dir)}); wait for it to end or stop it, or pass '
      'another --model_dir')


def release(model_dir: str) -> None:
  """Unlocks `model_dir` if this process holds it."""
  fd = _held.pop(model_dir, None)
  if fd is not None:
    os.close(fd)


def _holder(model_dir: str) -> str:
  """'pid N' of the process holding the lock, from /proc/locks."""
  st = os.stat(model_dir)
  # The kernel prints the device as hex major:minor, then the inode.
  where = f'{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}'
  try:
    with open('/proc/locks', encoding='ascii') as f:
      for line in f:
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"
        fields = line.split()
        if len(fields) > 5 and fields[1] == 'FLOCK' and fields[5] == where:
          return f'pid {fields[4]}'
  except OSError:
    pass
  return 'another process'
