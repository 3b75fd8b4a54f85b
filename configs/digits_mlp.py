"""Seed MLP (64-64-10) on the UCI handwritten digits, the default experiment.

Command:   python main.py --config=configs/digits_mlp.py
Runtime:   ~30 s on 2 CPU cores (3,000 steps of batch 64, Adam).
Expected:  final eval accuracy ~0.97 on the 360 held-out images (>= 0.95).
Watch:     tensorboard --logdir runs (README, "Monitoring"): loss, accuracy,
           gradient and weight norms, throughput, input wait, every 100 steps.

Variants (after ':'):
  smoke   20 steps, for tests and a quick check of a new install.
  sgd     SGD with Nesterov momentum 0.9 instead of Adam; ~0.97 as well.
"""

import ml_collections

VARIANTS = ('default', 'smoke', 'sgd')


def get_config(variant: str = 'default') -> ml_collections.ConfigDict:
  variant = variant or 'default'
  if variant not in VARIANTS:
    raise ValueError(f'config variant {variant!r} is unknown in '
                     f'configs/digits_mlp.py; valid: {", ".join(VARIANTS)}')
  config = ml_collections.ConfigDict()
  config.trainer = 'classifier'
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = 'digits'
  config.data.pipeline = 'per_host'   # or 'global'
  config.data.auto_shard = 'data'     # used by pipeline='global'

  config.model = ml_collections.ConfigDict()
  config.model.input_dim = 64
  config.model.hidden_sizes = (64, 64)
  config.model.num_classes = 10

  config.train = ml_collections.ConfigDict()
  config.train.steps = 3000
  config.train.global_batch_size = 64
  config.train.steps_per_loop = 100
  config.train.clip_norm = 0.0        # global-norm clipping; 0 disables
  config.train.nan_retries = 0        # restore + skip the bad batch, K times
  config.train.precision = 'auto'     # float32 | mixed_float16 |
                                      # mixed_bfloat16; auto: bf16 on TPU
  config.train.grad_accum_steps = 1   # micro-batches per optimizer step
  config.train.jit_compile = False    # XLA for the forward/backward pass
  config.train.ema_decay = 0.0        # moving average for eval/export; 0: off

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 1000
  config.checkpoint.max_to_keep = 3
  config.checkpoint.async_save = True

  config.eval = ml_collections.ConfigDict()
  config.eval.global_batch_size = 256
  config.eval.split = 'test'
  config.eval.every_steps = 1000      # with --mode=train_and_eval
  config.eval.timeout_secs = 300      # --mode=continuous_eval gives up after
  config.eval.best_metric = 'accuracy'  # kept in model_dir/best; '' for none
  config.eval.best_mode = 'max'
  config.eval.patience = 0            # early stop after N evals; 0: never

  config.summary = ml_collections.ConfigDict()
  config.summary.every_steps = 100    # TensorBoard train scalars every N steps
                                      # (need not divide steps_per_loop); 0: none
  config.summary.input_wait_every_loops = 10  # time the input wait on one
                                      # inner loop in N (it costs a few %)

  config.log = ml_collections.ConfigDict()
  config.log.every_secs = 0.0         # at most one progress line per N s; 0: one
                                      # per inner loop (e.g. 60 for long runs)

  config.export = ml_collections.ConfigDict()
  config.export.at_end = False        # SavedModel in model_dir/export

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'adam'
  config.optimizer.learning_rate = 1e-3
  config.optimizer.momentum = 0.0
  config.optimizer.nesterov = False

  if variant == 'smoke':
    config.train.steps = 20
    config.train.steps_per_loop = 10
    config.checkpoint.every_steps = 10
    config.eval.every_steps = 10
    config.summary.every_steps = 10
  elif variant == 'sgd':
    config.optimizer.name = 'sgd'
    config.optimizer.learning_rate = 0.05
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = True
  return config
