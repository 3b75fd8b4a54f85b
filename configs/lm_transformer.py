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


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  """What differs from the framework's defaults (trainer/schema.py)."""
  config = ml_collections.ConfigDict()
  config.trainer = 'lm'
  config.data = dict(
      files='',                        # glob of your text files; '': stdlib
      eval_percent=5,                  # share of files held out
      max_bytes=4_000_000,             # training bytes read (start-up time)
      max_eval_bytes=262_144)          # held-out bytes read
  config.model = dict(
      seq_len=128,                     # bytes of context (and per sequence)
      width=128, depth=2, heads=4,
      mlp_ratio=4,                     # MLP hidden width = mlp_ratio * width
      positions='learned',             # or 'rotary'
      tie_embeddings=True,
      # > 0: the token table in pieces of at most this many bytes, which
      # --strategy=parameter_server places on different ps tasks.
      embedding_shard_bytes=0,
      dropout=0.0)                     # ~2 passes over the data: no need
  config.train = dict(steps=2000, global_batch_size=32, clip_norm=1.0)
  config.checkpoint = dict(every_steps=500)
  config.eval = dict(global_batch_size=128, every_steps=500,
                     timeout_secs=300.0, best_metric='bits_per_byte',
                     best_mode='min')
  config.optimizer = dict(
      name='adamw', learning_rate=2e-3, beta_2=0.99, weight_decay=0.1,
      # Decay matrices only: not biases, LayerNorms or the position table.
      weight_decay_exclude=('bias', 'norm', 'position'),
      schedule='cosine', warmup_steps=100, end_learning_rate_factor=0.1)

  if variant == 'smoke':
    config.data.max_bytes = 100_000
    config.data.max_eval_bytes = 8_192
    config.model.update(seq_len=32, width=32, depth=1, heads=2)
    config.train.update(steps=6, global_batch_size=8, steps_per_loop=3)
    config.optimizer.warmup_steps = 2
    config.checkpoint.every_steps = 3
    config.eval.update(global_batch_size=32, every_steps=3)
  elif variant == 'rotary':
    config.model.positions = 'rotary'
  return config
