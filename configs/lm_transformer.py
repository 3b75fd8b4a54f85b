"""Byte-level Transformer LM on the Python standard library's source code.

Command:   python main.py --config=configs/lm_transformer.py --model_dir=runs/lm
Runtime:   ~5-8 min on 2 CPU cores (2,000 steps of 32 x 128 bytes, AdamW;
           7 min 39 s measured with other jobs sharing the cores).
Expected:  final eval bits_per_byte ~2.0 (measured: 1.96, next-byte accuracy
           0.63) on the 2,047 held-out windows of Python 3.11's stdlib; the
           unigram byte model scores 4.47 there, a uniform guess 8.
Compare:   python bench/lm_quality.py --model_dir=runs/lm   (the baselines on
           the same held-out bytes, and the run's last eval)
Watch:     tensorboard --logdir runs: loss, bits_per_byte, accuracy, norms.

Model: 2 pre-LN blocks, width 128, 4 heads, learned positions, tied
embeddings (0.45 M parameters). Data: 4 MB of the stdlib's *.py files for
training, ~5 % of the files held out (256 KB of them read for eval); see
input/text.py. Your own text: --config.data.files='/path/**/*.txt'.

Variants (after ':'):
  smoke   a tiny model for 6 steps on 100 KB, for tests and a quick check.
  rotary  rotary position embeddings (RoPE) instead of a learned table
          (no position parameters; quality not measured here).
"""

import ml_collections

VARIANTS = ('default', 'smoke', 'rotary')


def get_config(variant: str = 'default') -> ml_collections.ConfigDict:
  variant = variant or 'default'
  if variant not in VARIANTS:
    raise ValueError(f'config variant {variant!r} is unknown in '
                     f'configs/lm_transformer.py; valid: {", ".join(VARIANTS)}')
  config = ml_collections.ConfigDict()
  config.trainer = 'lm'
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.files = ''              # glob of your text files; '': stdlib
  config.data.eval_percent = 5        # share of files held out
  config.data.max_bytes = 4_000_000   # training bytes read (start-up time)
  config.data.max_eval_bytes = 262_144  # held-out bytes read
  config.data.pipeline = 'per_host'   # or 'global'
  config.data.auto_shard = 'data'     # used by pipeline='global'

  config.model = ml_collections.ConfigDict()
  config.model.seq_len = 128          # bytes of context (and per sequence)
  config.model.width = 128
  config.model.depth = 2
  config.model.heads = 4
  config.model.mlp_ratio = 4          # MLP hidden width = mlp_ratio * width
  config.model.positions = 'learned'  # or 'rotary'
  config.model.tie_embeddings = True
  config.model.dropout = 0.0          # ~2 passes over the data: no need

  config.train = ml_collections.ConfigDict()
  config.train.steps = 2000
  config.train.global_batch_size = 32
  config.train.steps_per_loop = 100
  config.train.clip_norm = 1.0        # global-norm clipping; 0 disables
  config.train.nan_retries = 0        # restore + skip the bad batch, K times
  config.train.precision = 'auto'     # float32 | mixed_float16 |
                                      # mixed_bfloat16; auto: bf16 on TPU
  config.train.grad_accum_steps = 1   # micro-batches per optimizer step
  config.train.jit_compile = False    # XLA-compile the train step
  config.train.ema_decay = 0.0        # EMA of the weights for eval; 0: none

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 500
  config.checkpoint.max_to_keep = 3
  config.checkpoint.async_save = True

  config.eval = ml_collections.ConfigDict()
  config.eval.global_batch_size = 128
  config.eval.split = 'test'          # the held-out files
  config.eval.every_steps = 500       # with --mode=train_and_eval
  config.eval.timeout_secs = 300      # --mode=continuous_eval gives up after
  config.eval.best_metric = 'bits_per_byte'  # kept in model_dir/best
  config.eval.best_mode = 'min'
  config.eval.patience = 0            # early stop after N evals; 0: never

  config.summary = ml_collections.ConfigDict()
  config.summary.every_steps = 100    # TensorBoard train scalars every N steps
  config.summary.input_wait_every_loops = 10  # time the input wait 1 loop in N

  config.log = ml_collections.ConfigDict()
  config.log.every_secs = 0.0         # at most one progress line per N s;
                                      # 0: one per inner loop

  config.export = ml_collections.ConfigDict()
  config.export.at_end = False        # SavedModel in model_dir/export

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 2e-3
  config.optimizer.beta_1 = 0.9
  config.optimizer.beta_2 = 0.99
  config.optimizer.weight_decay = 0.1
  # Decay matrices only: not biases, LayerNorms or the position table.
  config.optimizer.weight_decay_exclude = ('bias', 'norm', 'position')
  config.optimizer.schedule = 'cosine'
  config.optimizer.warmup_steps = 100
  config.optimizer.end_learning_rate_factor = 0.1
  config.optimizer.momentum = 0.0
  config.optimizer.nesterov = False

  if variant == 'smoke':
    config.data.max_bytes = 100_000
    config.data.max_eval_bytes = 8_192
    config.model.seq_len = 32
    config.model.width = 32
    config.model.depth = 1
    config.model.heads = 2
    config.train.steps = 6
    config.train.global_batch_size = 8
    config.train.steps_per_loop = 3
    config.optimizer.warmup_steps = 2
    config.checkpoint.every_steps = 3
    config.eval.global_batch_size = 32
    config.eval.every_steps = 3
    config.summary.every_steps = 3
  elif variant == 'rotary':
    config.model.positions = 'rotary'
  return config
