"""The worked example's config (examples/regression.py).

Command:   python main.py --config=examples/regression_config.py
Runtime:   ~10 s on 2 CPU cores (1,500 steps of batch 64).
Expected:  final eval abs_error ~0.02 (measured 0.0236) on the 2,048 held-out
           points; predicting the mean scores 0.67.

Variants (after ':'):
  smoke   30 steps, for a quick check.
"""

import ml_collections

VARIANTS = ('default', 'smoke')


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.trainer = 'examples.regression:RegressionTrainer'  # By import path.
  config.model = dict(width=64)
  config.train = dict(steps=1500, global_batch_size=64)
  config.eval = dict(every_steps=500, best_metric='abs_error', best_mode='min')
  config.optimizer = dict(name='adam', learning_rate=3e-3, schedule='cosine',
                          warmup_steps=50)
  if variant == 'smoke':
    config.train.steps = 30
    config.train.steps_per_loop = 10
    config.optimizer.warmup_steps = 5
  return config
