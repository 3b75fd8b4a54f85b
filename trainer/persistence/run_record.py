"""The run record: what must not change when a run is resumed (run.json),
and atomic writes of the small files beside the checkpoints."""

import glob
import json
import os

from trainer.errors import UserError

RECORD = 'run.json'


def build(config, trainer) -> dict:
  """The settings a checkpoint's meaning depends on."""
  return {
      'trainer': config.trainer,
      'seed': config.seed,
      'train.global_batch_size': config.train.global_batch_size,
      'optimizer.name': config.optimizer.name,
      # Where the pipeline runs is not what it reads: a run may resume
      # through another tf.data service address, or without one.
      'data': {key: value for key, value in config.data.to_dict().items()
               if key != 'service'},
      'model weights': {v.path: list(v.shape) for v in trainer.model.weights},
      # A checkpoint without the average cannot seed one (it would start
      # from the initial weights), and the reverse would drop it.
      'train.ema': trainer.ema is not None,
  }


# What the checkpoint's model depends on: all that evaluation and export,
# which read the model and nothing else of the run, must keep.
MODEL_KEYS = ('trainer', 'model weights', 'train.ema')


def check_or_write(model_dir: str, record: dict, *, write: bool = True,
                   reading: str = '') -> None:
  """Refuses to resume a run whose record differs; writes it for a new run.

  Changing the model, global batch, data, seed, optimizer or trainer would
  mix two different runs in one model_dir (the data position, for one, counts
  global batches). Everything else (train.steps, learning rate, cadences) may
  change between restarts. A mode that only reads the model (`reading`:
  'eval' or 'export') checks MODEL_KEYS only: it may evaluate with another
  batch size, on other data, under another seed.

  Raises:
    UserError: naming the first setting that changed, old and new values.
  """
  path = os.path.join(model_dir, RECORD)
  record = dict(record)
  layout = record.pop('layout', None)
  # Checked for training only (check_pieces): evaluation and export read
  # a checkpoint's model with any pieces.
  pieces = record.pop('pieces', None)
  made_by = record.pop('pieces_made_by', None)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    for key in record:
      if (key not in old or _jsonable(record[key]) == old[key] or
          reading and key not in MODEL_KEYS):
        continue
      if isinstance(old[key], dict) and isinstance(record[key], dict):
        keys = sorted(set(old[key]) | set(record[key]))
        sub = next(k for k in keys
                   if _jsonable(record[key].get(k)) != old[key].get(k))
        before, after = (repr(d[sub]) if sub in d else '(not set)'
                         for d in (old[key], record[key]))
        what = f'{key} {sub!r}: {before} -> {after}'
        if key == 'model weights':
          what += " (the model's code or a model.* config key changed)"
      else:
        what = f'{key}: {old[key]!r} -> {record[key]!r}'
      raise _changed(model_dir, what, reading)
    if write and layout and old.get('layout') != layout:
      write_json_atomically(path, dict(old, layout=layout))
    return
  if write:
    extra = {key: value for key, value in
             (('layout', layout), ('pieces', pieces),
              ('pieces_made_by', made_by if pieces else None)) if value}
    write_json_atomically(path, dict(record, **extra))


def check_pieces(model_dir: str, pieces: dict, made_by: str) -> None:
  """Refuses to resume training with the variables in other pieces.

  `pieces` is {weight path: rows of each piece} of the weights held in
  pieces (parts/sharding.py), `made_by` the settings that made them. The
  model's weights are saved whole, but the optimizer keeps its slots per
  piece.

  Raises:
    UserError: naming the first weight whose pieces changed.
  """
  path = os.path.join(model_dir, RECORD)
  if not os.path.exists(path):
    return
  with open(path) as f:
    record = json.load(f)
  old = record.get('pieces') or {}
  if old == _jsonable(pieces):
    return
  old_by = record.get('pieces_made_by')
  name = sorted(name for name in set(old) | set(pieces)
                if old.get(name) != pieces.get(name))[0]
  def describe(rows, by):
    return (f'{len(rows)} pieces' if rows else 'whole') + (
        f' ({by})' if by else '')
  raise UserError(
      f'cannot resume --model_dir={model_dir}: variable {name!r} was '
      f'{describe(old.get(name), old_by)} and is now '
      f'{describe(pieces.get(name), made_by)}, and the optimizer keeps its '
      'slots per piece; resume as it was, or start a new --model_dir '
      '(--mode=eval and export read it either way)')


def _changed(model_dir: str, what: str, reading: str = '') -> UserError:
  if reading:
    return UserError(
        f'--mode={reading} cannot read --model_dir={model_dir}: {what} '
        f'since the run was trained ({RECORD}); undo the change: the '
        'checkpoint holds the model it trained')
  # A run that saved nothing (a mistake or a NaN at its first steps) still
  # wrote its TensorBoard config, hparams and goodput: a changed start there
  # would mix two runs in them, but a new one loses nothing.
  fix = ('undo the change or use a new --model_dir' if any(
      glob.glob(os.path.join(model_dir, *where, 'ckpt-*.index'))
      for where in ((), ('best',))) else 'it saved no checkpoint, so '
         'nothing is lost by starting over: use a new --model_dir, or remove '
         'this one')
  return UserError(f'cannot resume --model_dir={model_dir}: {what} since the '
                   f'run started ({RECORD}); {fix}')


def write_json_atomically(path: str, value) -> None:
  """Writes JSON to `path` so a reader never sees a partial file."""
  write_text_atomically(path, json.dumps(value, indent=2, sort_keys=True))


def write_text_atomically(path: str, text: str) -> None:
  """Writes `text` to `path` via a temporary file and a rename."""
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _jsonable(value):
  return json.loads(json.dumps(value))


def layout(strategy, config) -> dict:
  """How a run is distributed: replicas, workers (input pipelines), pipeline."""
  resolver = strategy.cluster_resolver
  workers = 1
  if resolver is not None:
    jobs = resolver.cluster_spec().as_dict()
    workers = max(1, len(jobs.get('worker', [])) + len(jobs.get('chief', [])))
  return {'replicas': strategy.num_replicas_in_sync, 'workers': workers,
          'pipeline': config.data.pipeline}


def check_layout(model_dir: str, new: dict, global_batch_size: int) -> None:
  """Refuses to resume where the example stream cannot continue.

  With data.pipeline='per_host' (the default) the global order of the
  examples does not depend on how many hosts read them (input/pipeline.py),
  so a run may resume on any other replica and worker layout whose replica
  count divides the global batch. With 'global', the strategy's auto-shard
  deals elements to workers, so the worker count must stay.

  Raises:
    UserError: naming the layout the run had and the one asked for, or the
      global batch, if it changed (checked first: the divisibility message
      names the batch the run had).
  """
  path = os.path.join(model_dir, RECORD)
  if not os.path.exists(path):
    return
  with open(path) as f:
    record = json.load(f)
  key, batch = 'train.global_batch_size', record.get('train.global_batch_size')
  if batch is not None and batch != global_batch_size:
    raise _changed(model_dir, f'{key}: {batch!r} -> {global_batch_size!r}')
  old = record.get('layout')
  if not old or old == new:
    return
  def describe(layout):
    return (f'{layout["replicas"]} replica(s) on {layout["workers"]} '
            f'worker(s)')
  if global_batch_size % new['replicas']:
    raise UserError(
        f'cannot resume --model_dir={model_dir} on {describe(new)}: it ran on '
        f'{describe(old)} with train.global_batch_size={global_batch_size}, '
        f'which does not divide by {new["replicas"]} replicas; resume on a '
        'layout whose replica count divides it (the global batch must stay)')
  if new['pipeline'] == 'global' and old['workers'] != new['workers']:
    raise UserError(
        f'cannot resume --model_dir={model_dir} on {describe(new)}: it ran on '
        f'{describe(old)} with data.pipeline=global, whose auto-shard deals '
        'examples to workers, so the stream would change; keep '
        f'{old["workers"]} worker(s), or start runs with data.pipeline='
        'per_host, which keeps the stream on any layout')
