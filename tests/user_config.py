"""A user's config for the trainers of tests/user_trainers.py (kept outside
configs/ and models/, as a user keeps theirs).

Command:   python main.py --config=tests/user_config.py:two_optimizers
Variants:  two_optimizers (default), sync_norm_accum, tutorial,
           model_variables, unsynced_norm.
"""

import ml_collections

TRAINERS = {
    'two_optimizers': 'tests.user_trainers:TwoOptimizerTrainer',
    'sync_norm_accum': 'tests.user_trainers:SyncNormTrainer',
    'tutorial': 'tests.user_trainers:TutorialTrainer',
    'model_variables': 'tests.user_trainers:ModelVariablesTutorial',
    'unsynced_norm': 'tests.user_trainers:UnsyncedNormTrainer',
}
VARIANTS = tuple(TRAINERS)


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  variant = variant or 'two_optimizers'
  if variant not in TRAINERS:
    raise ValueError(f'config variant {variant!r} is unknown in '
                     f'tests/user_config.py; valid: {", ".join(VARIANTS)}')
  config = ml_collections.ConfigDict()
  config.trainer = TRAINERS[variant]
  config.seed = 3
  config.data = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict()
  config.train = ml_collections.ConfigDict(dict(
      steps=16, global_batch_size=32, steps_per_loop=8,
      grad_accum_steps=2 if variant == 'sync_norm_accum' else 1))
  config.checkpoint = ml_collections.ConfigDict(dict(every_steps=0))
  config.eval = ml_collections.ConfigDict(dict(global_batch_size=64))
  config.optimizer = ml_collections.ConfigDict(dict(
      name='adam', learning_rate=0.02))
  return config
