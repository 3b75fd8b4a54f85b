"""Metric writers: the narrow interface the framework writes summaries through.

  writer.write_scalars(step, {'metrics/loss': 0.1, ...})
  writer.write_texts(step, {'config': '...'})
  writer.write_images(step, {'eval/examples': images_NHWC}, descriptions)
  writer.write_histograms(step, {'weights/dense/kernel': values})
  writer.write_hparams({'optimizer.learning_rate': 1e-3, ...})
  writer.flush(); writer.close()

`TensorBoardWriter` writes TensorBoard event files into one directory with one
`tf.summary` file writer: exactly one writer per directory, because two
writers in one directory make TensorBoard skip events (tensorboard#1011).
`MemoryWriter` keeps everything in lists for unit tests, and `NullWriter`
drops everything (workers other than the chief, modes that write nothing).

Everything here runs on the host, eagerly, between inner loops: never inside
a `tf.function` or a TPU step.
"""

import abc
import glob
import json
import os
from typing import Any, Mapping

from absl import logging
import numpy as np
import tensorflow as tf
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.hparams import api as hparams_api


class MetricWriter(abc.ABC):
  """Where summaries go. `step` is the global step the values belong to."""

  @abc.abstractmethod
  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Writes one float per tag at `step`."""

  @abc.abstractmethod
  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Writes one (markdown) text per tag at `step`."""

  def write_images(self, step: int, images: Mapping[str, Any],
                   descriptions: Mapping[str, str] | None = None) -> None:
    """Writes a batch of images [N, H, W, C] (floats in [0, 1]) per tag at
    `step` (TensorBoard's Images tab), with an optional markdown description
    per tag."""

  def write_histograms(self, step: int, values: Mapping[str, Any]) -> None:
    """Writes the distribution of a tensor's values per tag at `step`
    (TensorBoard's Histograms and Distributions tabs)."""

  @abc.abstractmethod
  def write_hparams(self, hparams: Mapping[str, Any], *,
                    trial_id: str = '') -> None:
    """Writes the run's hyperparameters (TensorBoard's HParams dashboard).

    The dashboard takes the metric columns from the scalars of this
    directory's subdirectories, so write them into the run's root directory
    and the scalars into `train/` and `eval/` below it. Runs with the same
    `trial_id` form one session group, whose metrics the dashboard averages;
    without one, runs whose hyperparameters are equal would be grouped (a
    resumed run, or the same config on another strategy), so pass the
    run's name.
    """

  def flush(self) -> None:
    """Makes everything written so far visible to readers."""

  def close(self) -> None:
    """Flushes and releases the writer; it must not be used afterwards."""


class NullWriter(MetricWriter):
  """Writes nothing: for non-chief workers and modes that keep no summaries."""

  def write_scalars(self, step, scalars):
    pass

  def write_texts(self, step, texts):
    pass

  def write_hparams(self, hparams, *, trial_id=''):
    pass


class MemoryWriter(MetricWriter):
  """Keeps what is written, in order, for tests.

  Attributes:
    scalars: [(step, {tag: value})], one entry per write_scalars call.
    texts: [(step, {tag: text})].
    images: [(step, {tag: numpy images}, {tag: description})].
    histograms: [(step, {tag: numpy values})].
    hparams: [{name: value}].
    trial_ids: the trial id of each write_hparams call.
    closed: whether close() was called.
  """

  def __init__(self):
    self.scalars, self.texts, self.hparams = [], [], []
    self.images, self.histograms = [], []
    self.trial_ids = []
    self.flushes = 0
    self.closed = False

  def write_scalars(self, step, scalars):
    self.scalars.append((int(step), {k: float(v) for k, v in scalars.items()}))

  def write_texts(self, step, texts):
    self.texts.append((int(step), dict(texts)))

  def write_images(self, step, images, descriptions=None):
    self.images.append((int(step), {k: np.asarray(v) for k, v in
                                    images.items()}, dict(descriptions or {})))

  def write_histograms(self, step, values):
    self.histograms.append((int(step), {k: np.asarray(v) for k, v in
                                        values.items()}))

  def write_hparams(self, hparams, *, trial_id=''):
    self.hparams.append(dict(hparams))
    self.trial_ids.append(trial_id)

  def flush(self):
    self.flushes += 1

  def close(self):
    self.closed = True

  def steps(self) -> list[int]:
    return [step for step, _ in self.scalars]

  def series(self, tag: str) -> list[tuple[int, float]]:
    """[(step, value)] of one scalar tag."""
    return [(step, values[tag]) for step, values in self.scalars
            if tag in values]


class TensorBoardWriter(MetricWriter):
  """One `tf.summary` file writer for one directory.

  Args:
    logdir: the directory; created if needed.
    resume_step: the step this process starts from (the restored checkpoint).
      Steps after it that an earlier process wrote before it died are
      orphans (this process runs those steps again), so they are removed
      from the existing event files before writing starts; see
      `trim_event_files`. None: leave existing files alone.

  A value for a tag at a step not after the newest step already in the
  directory for that tag is skipped with a debug log: re-evaluating the final
  checkpoint of a finished run, or restarting an evaluator, then adds no
  second point at the same step.
  """

  def __init__(self, logdir: str, *, resume_step: int | None = None):
    self.logdir = logdir
    os.makedirs(logdir, exist_ok=True)
    self._last_step = {}
    if resume_step is not None:
      self._last_step = trim_event_files(logdir, resume_step)
    else:
      self._last_step = last_steps(logdir)
    self._writer = tf.summary.create_file_writer(logdir)

  def _new(self, step: int, tag: str) -> bool:
    last = self._last_step.get(tag)
    if last is not None and step <= last:
      logging.debug('%s: %s at step %d is already written (up to %d); '
                    'skipped', self.logdir, tag, step, last)
      return False
    return True

  def _written(self, step: int, tags) -> None:
    for tag in tags:
      self._last_step[tag] = step

  def write_scalars(self, step, scalars):
    scalars = {k: v for k, v in scalars.items() if self._new(step, k)}
    with self._writer.as_default():
      for tag, value in scalars.items():
        tf.summary.scalar(tag, value, step=step)
    self._written(step, scalars)

  def write_texts(self, step, texts):
    texts = {k: v for k, v in texts.items() if self._new(step, k)}
    with self._writer.as_default():
      for tag, text in texts.items():
        tf.summary.text(tag, text, step=step)
    self._written(step, texts)

  def write_images(self, step, images, descriptions=None):
    images = {k: v for k, v in images.items() if self._new(step, k)}
    descriptions = descriptions or {}
    with self._writer.as_default():
      for tag, batch in images.items():
        tf.summary.image(tag, batch, step=step, max_outputs=len(batch),
                         description=descriptions.get(tag))
    self._written(step, images)

  def write_histograms(self, step, values):
    values = {k: v for k, v in values.items() if self._new(step, k)}
    with self._writer.as_default():
      for tag, value in values.items():
        tf.summary.histogram(tag, value, step=step)
    self._written(step, values)

  def write_hparams(self, hparams, *, trial_id=''):
    # hparams_api.hparams writes at step 0 under this tag.
    tag = '_hparams_/session_start_info'
    if not self._new(0, tag):
      return
    with self._writer.as_default():
      hparams_api.hparams(dict(hparams), trial_id=trial_id or None)
    self._written(0, [tag])

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


def event_files(logdir: str) -> list[str]:
  """The TensorBoard event files directly in `logdir`, oldest first."""
  return sorted(glob.glob(os.path.join(logdir, '*tfevents*')))


def read_events(path: str) -> tuple[list[bytes], bool]:
  """(serialized Event records of `path`, whether it ended cleanly).

  A file cut short (a process killed mid-write) yields the records before
  the damage and False.
  """
  records = []
  try:
    for record in tf.data.TFRecordDataset(path):
      records.append(record.numpy())
  except tf.errors.DataLossError:
    return records, False
  return records, True


def _tags(event) -> list[str]:
  return [value.tag for value in event.summary.value]


def last_steps(logdir: str) -> dict[str, int]:
  """{tag: newest step} over the event files in `logdir`."""
  last = {}
  for path in event_files(logdir):
    for record in read_events(path)[0]:
      event = event_pb2.Event.FromString(record)
      for tag in _tags(event):
        last[tag] = max(last.get(tag, event.step), event.step)
  return last


def trim_event_files(logdir: str, resume_step: int) -> dict[str, int]:
  """Drops summaries after `resume_step` from the event files in `logdir`.

  Why: a run killed after its last checkpoint at step S has written
  summaries for steps after S; the resumed run trains those steps again and
  writes them again, and the directory would hold two values for one step.
  TensorBoard's own remedy ("purge orphaned data" on an out-of-order step)
  lives in the reader and is not applied by every loader; removing the
  orphans from the files makes every reader see one value per step.

  Each affected file is rewritten without those records (and without a
  damaged tail) into a temporary file that then replaces it atomically.

  Returns:
    {tag: newest step} of what is left.
  """
  last = {}
  for path in event_files(logdir):
    records, clean = read_events(path)
    kept = []
    for record in records:
      event = event_pb2.Event.FromString(record)
      tags = _tags(event)
      if tags and event.step > resume_step:
        continue
      kept.append(record)
      for tag in tags:
        last[tag] = max(last.get(tag, event.step), event.step)
    if len(kept) == len(records) and clean:
      continue
    logging.info('%s: removed %d summaries after step %d (written by a run '
                 'that stopped before checkpointing them)%s', path,
                 len(records) - len(kept), resume_step,
                 '' if clean else ' and a damaged tail')
    tmp = os.path.join(logdir, f'.trim-{os.getpid()}')
    with tf.io.TFRecordWriter(tmp) as writer:
      for record in kept:
        writer.write(record)
    os.replace(tmp, path)
  return last


def append_eval_record(model_dir: str, record: Mapping[str, Any]) -> None:
  """Appends one evaluation's line to model_dir/eval/metrics.jsonl."""
  os.makedirs(os.path.join(model_dir, 'eval'), exist_ok=True)
  line = (json.dumps(dict(record)) + '\n').encode()
  with open(os.path.join(model_dir, 'eval', 'metrics.jsonl'), 'ab+') as f:
    if f.seek(0, os.SEEK_END):
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b'\n':
        line = b'\n' + line  # After a line that a crash cut short.
    f.write(line)


def eval_recorded(model_dir: str, step: int, split: str) -> bool:
  """Whether model_dir/eval/metrics.jsonl has an evaluation of `split` at
  `step` (a line cut short by a crash is not one)."""
  return eval_record(model_dir, step, split) is not None


def eval_record(model_dir: str, step: int, split: str) -> dict | None:
  """The metrics of the last evaluation of `split` at `step` in
  model_dir/eval/metrics.jsonl, or None."""
  try:
    with open(os.path.join(model_dir, 'eval', 'metrics.jsonl')) as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    return None
  found = None
  for line in lines:
    try:
      record = json.loads(line)
    except ValueError:
      continue  # Cut short by a crash.
    if (isinstance(record, dict) and record.get('step') == step and
        record.get('split') == split):
      found = {k: v for k, v in record.items()
               if k not in ('step', 'split')}
  return found


def flatten(config: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'train.steps': 3000, ...}: a nested config as hparams values.

  Values TensorBoard's hparams cannot hold (tuples, None, ...) become their
  string form.
  """
  flat = {}
  for key, value in config.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping):
      flat.update(flatten(value, f'{name}.'))
    elif isinstance(value, (bool, int, float, str)):
      flat[name] = value
    else:
      flat[name] = str(value)
  return flat


def config_markdown(config) -> str:
  """The resolved config as a markdown code block (TensorBoard's Text tab)."""
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  return '\n'.join('    ' + line for line in text.splitlines())
