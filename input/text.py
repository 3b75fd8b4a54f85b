"""Byte-level text: files -> fixed-length (inputs, targets) training windows.

Vocabulary: the 256 byte values, nothing else. No tokenizer to train or ship,
any file in any encoding is valid input, and the loss in nats per token
converts to bits per byte by dividing by ln 2. Documents are joined into one
byte stream, each followed by SEPARATOR (byte 0, NUL): it never occurs in
source code or ordinary text, so it marks "end of file" unambiguously and no
extra pad or separator id is needed (every window is full, nothing is padded).

Data (`config.data`, read by `Source.from_config`):
  files          '' (default): the Python standard library's own *.py files,
                 read where this Python keeps them (no download), without
                 site-packages, test suites, generated tables (encodings/,
                 pydoc_data/) and files over MAX_STDLIB_FILE bytes.
                 Otherwise a glob pattern of the user's text files ('**'
                 recurses, '~' expands); it must match at least one file.
  eval_percent   share of *files* held out for evaluation (default 5).
  max_bytes      training bytes read (default 4,000,000): caps start-up time
                 and memory (the default run passes over it about twice).
  max_eval_bytes held-out bytes read (default 262,144: ~2,000 windows of 128).

The split is by file, so held-out text is never trained on, and by a hash of
the file's path relative to its root (the stdlib directory, or the fixed
leading directories of the glob pattern): the same file lands in the same
split on every machine, whatever the install location, and adding a file
moves no other. When a cap is below a split's size, files are taken in hash
order (a deterministic sample spread over the whole collection rather than the
alphabetically first packages) and the last one is cut at the cap. The
stdlib's contents depend on the Python version, so numbers are comparable
between runs of one Python version.

Windows: seq_len + 1 bytes starting every seq_len bytes, inputs = the first
seq_len, targets = the last seq_len. Consecutive windows share one byte (the
last target of one is the first input of the next), so every byte of the
stream after the first is a target exactly once; a tail shorter than a window
is dropped. Training windows go through pipeline.finish (global-order
sharding, seeded reshuffle every epoch, repeat, drop_remainder), which exact
resume relies on; eval windows are read once in order, partial last batch
kept. Streams are built in memory (a fraction of a second for the defaults)
and kept per process; nothing is written to disk.
"""

import dataclasses
import functools
import glob
import hashlib
import os
import sysconfig

import numpy as np
import tensorflow as tf

from input import pipeline
from trainer.errors import UserError

VOCAB_SIZE = 256
SEPARATOR = 0
SPLITS = ('train', 'test')  # 'test': the held-out files.
MAX_STDLIB_FILE = 256 * 1024
# Stdlib directories left out: test suites, installed packages, and
# generated tables (the ~100 charmap codecs of encodings/, pydoc's topic
# texts), which are data rather than code and would flatter the metric.
_SKIP_DIRS = ('site-packages', 'dist-packages', '__pycache__', 'test', 'tests',
              'idle_test', 'encodings', 'pydoc_data')


@dataclasses.dataclass(frozen=True)
class Source:
  """Where the text comes from and how much of it is read (see module doc)."""
  files: str = ''
  eval_percent: int = 5
  max_bytes: int = 4_000_000
  max_eval_bytes: int = 262_144

  @classmethod
  def from_config(cls, data) -> 'Source':
    """Reads and checks `config.data` (missing keys take the defaults)."""
    defaults = cls()
    values = {f.name: data.get(f.name, getattr(defaults, f.name))
              for f in dataclasses.fields(cls)}
    if not isinstance(values['files'], str):
      raise UserError(f'config key data.files={values["files"]!r} must be a '
                      "glob pattern string, or '' for the Python standard "
                      'library')
    percent = values['eval_percent']
    if not isinstance(percent, int) or not 1 <= percent <= 50:
      raise UserError(f'config key data.eval_percent={percent!r} must be an '
                      'integer from 1 to 50 (the share of files held out)')
    for key in ('max_bytes', 'max_eval_bytes'):
      if not isinstance(values[key], int) or values[key] < 1:
        raise UserError(f'config key data.{key}={values[key]!r} must be a '
                        'positive integer number of bytes')
    return cls(**values)


def stdlib_files() -> list[tuple[str, str]]:
  """(path relative to the stdlib, absolute path) of its *.py files, sorted."""
  root = sysconfig.get_paths()['stdlib']
  found = []
  for directory, subdirs, names in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d not in _SKIP_DIRS
                        and not d.startswith('test_'))
    for name in names:
      path = os.path.join(directory, name)
      if (name.endswith('.py') and not name.startswith('test_') and
          os.path.getsize(path) <= MAX_STDLIB_FILE):
        found.append((os.path.relpath(path, root), path))
  return sorted(found)


def matching_files(pattern: str) -> list[tuple[str, str]]:
  """(path relative to the pattern's fixed leading directories, path), sorted.

  Raises:
    UserError: the pattern matches no regular file.
  """
  expanded = os.path.expanduser(pattern)
  paths = sorted(p for p in glob.glob(expanded, recursive=True)
                 if os.path.isfile(p))
  if not paths:
    raise UserError(
        f'config key data.files={pattern!r} matches no file; pass a glob '
        "pattern of text files, quoted, e.g. --config.data.files='/data/"
        "corpus/**/*.txt', or '' for the Python standard library")
  root = os.path.dirname(expanded)
  while glob.has_magic(root):
    root = os.path.dirname(root)
  return [(os.path.relpath(p, root or os.curdir), p) for p in paths]


def _hash(relative_path: str) -> int:
  return int.from_bytes(
      hashlib.sha256(relative_path.encode('utf-8')).digest()[:8], 'big')


def split_of(relative_path: str, eval_percent: int) -> str:
  """'test' (held out) or 'train': a fixed function of the relative path."""
  return 'test' if _hash(relative_path) % 100 < eval_percent else 'train'


def split_files(source: Source, split: str) -> list[tuple[str, str]]:
  """(relative path, path) of the files of `split`, in the order they are read.

  Raises:
    UserError: an unknown split, no file in the split.
  """
  if split not in SPLITS:
    raise UserError(f'text split {split!r} is unknown (config key eval.split); '
                    f'valid: {", ".join(SPLITS)}')
  files = (matching_files(source.files) if source.files else stdlib_files())
  chosen = [(rel, path) for rel, path in files
            if split_of(rel, source.eval_percent) == split]
  if not chosen:
    raise UserError(
        f'config key data.files={source.files!r} gives {len(files)} file(s), '
        f'none of them in the {split!r} split (data.eval_percent='
        f'{source.eval_percent}% of files, by path hash); add files or '
        'change data.eval_percent')
  return sorted(chosen, key=lambda f: (_hash(f[0]), f[0]))


@functools.lru_cache(maxsize=8)
def load_stream(source: Source, split: str) -> np.ndarray:
  """The byte stream of `split`: documents each followed by SEPARATOR.

  Returns:
    uint8 [num_bytes], at most max_bytes (train) or max_eval_bytes (test).
  Raises:
    UserError: as split_files.
  """
  cap = source.max_bytes if split == 'train' else source.max_eval_bytes
  chunks, total = [], 0
  for _, path in split_files(source, split):
    with open(path, 'rb') as f:
      chunk = f.read(cap - total) + bytes([SEPARATOR])
    chunks.append(chunk[:cap - total])
    total += len(chunks[-1])
    if total >= cap:
      break
  return np.frombuffer(b''.join(chunks), dtype=np.uint8)


def windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
  """[N, seq_len + 1] windows starting every seq_len bytes (a copy).

  Window i is stream[i * seq_len : (i + 1) * seq_len + 1]; N is
  (len(stream) - 1) // seq_len, so a tail too short for a window is dropped.
  """
  count = max((len(stream) - 1) // seq_len, 0)
  if not count:
    return np.zeros([0, seq_len + 1], stream.dtype)
  view = np.lib.stride_tricks.sliding_window_view(stream, seq_len + 1)
  return np.ascontiguousarray(view[::seq_len][:count])


def check_length(source: Source, split: str, seq_len: int) -> np.ndarray:
  """load_stream(source, split), checked to hold at least one window.

  Raises:
    UserError: as load_stream, or fewer than seq_len + 1 bytes.
  """
  stream = load_stream(source, split)
  if len(stream) < seq_len + 1:
    cap = 'max_bytes' if split == 'train' else 'max_eval_bytes'
    raise UserError(
        f'config key model.seq_len={seq_len} needs windows of {seq_len + 1} '
        f'bytes but the {split!r} text has {len(stream)}; lower model.seq_len, '
        f'raise data.{cap} or add text (data.files)')
  return stream


def split_window(window):
  """(inputs, targets) int32 from uint8 windows [..., seq_len + 1]."""
  window = tf.cast(window, tf.int32)
  return window[..., :-1], window[..., 1:]


def dataset(split: str, *, source: Source, seq_len: int,
            input_context: tf.distribute.InputContext, batch_size: int,
            seed: int) -> tf.data.Dataset:
  """Batched (inputs, targets) int32 [B, seq_len] for one input pipeline.

  'train' is shuffled with `seed`, repeated and batched with drop_remainder;
  'test' is read once, in order, keeping its partial last batch.

  Raises:
    UserError: as check_length.
  """
  examples = windows(check_length(source, split, seq_len), seq_len)
  ds = pipeline.finish(
      tf.data.Dataset.from_tensor_slices(examples),
      input_context=input_context, batch_size=batch_size,
      training=split == 'train', seed=seed, num_examples=len(examples))
  # On whole batches, after finish's sharding: one cheap vectorised op each.
  return ds.map(split_window).prefetch(tf.data.AUTOTUNE)
