"""The extras example's config (examples/extras.py).

Command:   python main.py --config=examples/extras_config.py
Runtime:   ~15 s on 2 CPU cores (1,500 steps of batch 64).
Expected:  final eval accuracy ~0.97, auc ~1.0, f1 ~0.97 on the 360 held-out
           digits; TensorBoard shows predicted_class histograms and a note.

Variants (after ':'):
  smoke   40 steps.
"""

from configs import digits_mlp

VARIANTS = ('default', 'smoke')


def get_config(variant: str = ''):
  config = digits_mlp.get_config()
  config.trainer = 'examples.extras:ExtrasTrainer'
  config.train.steps = 1500
  config.eval.every_steps = 500
  if variant == 'smoke':
    config.train.steps = 40
    config.train.steps_per_loop = 10
    config.eval.every_steps = 20
  return config
