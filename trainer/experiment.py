"""One experiment from resolved flags and config: what main.py calls.

Order matters for the promise that bad input writes nothing: every check
(config keys, strategy, batch sizes, model, data) runs before model_dir is
created.
"""

import datetime
import os

from absl import logging
import tensorflow as tf

import models  # noqa: F401  (registers the trainers)
from trainer import checkpointing
from trainer import controller as controller_lib
from trainer import registry
from trainer import strategies
from trainer.errors import UserError

REQUIRED_KEYS = ('trainer', 'seed', 'train.steps', 'train.global_batch_size',
                 'train.steps_per_loop', 'optimizer.name',
                 'optimizer.learning_rate', 'eval.global_batch_size')


def check_config(config) -> None:
  """Raises UserError for a missing required key or a non-positive count."""
  for key in REQUIRED_KEYS:
    node = config
    for part in key.split('.'):
      if part not in node:
        raise UserError(f'config key {key} is missing; every config needs '
                        f'{", ".join(REQUIRED_KEYS)}')
      node = node[part]
  for key in ('steps', 'global_batch_size', 'steps_per_loop'):
    value = config.train[key]
    if not isinstance(value, int) or value < 1:
      raise UserError(f'config key train.{key}={value!r} must be an integer '
                      '>= 1')


def default_model_dir(config_path: str) -> str:
  """runs/<config name>-<variant>-<timestamp>, relative to the working dir."""
  name = os.path.basename(config_path).replace('.py', '').replace(':', '-')
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  return os.path.join('runs', f'{name}-{stamp}')


def prepare_model_dir(model_dir: str) -> None:
  """Creates model_dir, or raises a UserError naming --model_dir."""
  try:
    os.makedirs(model_dir, exist_ok=True)
    probe = os.path.join(model_dir, '.write_probe')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise UserError(f'flag --model_dir={model_dir!r} is not a writable '
                    f'directory ({e.strerror}); pass a directory you can '
                    'write to') from e


def build_trainer(config, strategy):
  """Returns the configured Trainer subclass built under `strategy`."""
  trainer_cls = registry.get(config.trainer)
  return trainer_cls(config=config, strategy=strategy)


def run(config, *, model_dir: str, strategy_name: str, tpu: str = '',
        tpu_timeout: float = 300.0, deterministic: bool = False):
  """Trains `config`, saves the final checkpoint, evaluates on 'test'.

  Returns:
    The eval metrics on the held-out split.
  Raises:
    UserError: any bad flag or config value, before anything is written.
  """
  check_config(config)
  tf.keras.utils.set_random_seed(config.seed)
  if deterministic:
    tf.config.experimental.enable_op_determinism()
  strategy = strategies.build_strategy(strategy_name, tpu=tpu,
                                       tpu_timeout=tpu_timeout)
  trainer = build_trainer(config, strategy)
  logging.info('%s on %d replica(s) (%s), global batch %d',
               type(trainer).__name__, trainer.num_replicas,
               type(strategy).__name__, trainer.global_batch_size)

  prepare_model_dir(model_dir)
  with open(os.path.join(model_dir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))

  controller = controller_lib.Controller(
      trainer=trainer, total_steps=config.train.steps,
      steps_per_loop=config.train.steps_per_loop)
  controller.train()
  path = checkpointing.checkpoint_manager(trainer, model_dir).save()
  logging.info('saved %s', path)
  return controller.evaluate('test')
