"""Is the language model any good? Its held-out bits/byte against baselines.

  python bench/lm_quality.py --model_dir=runs/lm_transformer-20260101-120000
  python bench/lm_quality.py        # baselines only, for the default data

Scores, on exactly the bytes the LM's evaluation scores (the targets of the
held-out windows of input/text.py, same data keys and seq_len as the run's
config.json):

  uniform  8 bits per byte: no model at all.
  unigram  the byte frequencies of the run's training stream, with add-one
           (Laplace) smoothing so no held-out byte has probability 0: what a
           model knows that learned nothing about context.
  LM       the run's last evaluation on the held-out split
           (model_dir/eval/metrics.jsonl, written by every mode that
           evaluates; `python main.py --mode=eval --model_dir=DIR
           --config=...` adds one for the latest checkpoint).

A model that uses context must come in well below the unigram. Exits 1 when
it does not, 2 on bad input.
"""

import contextlib
import json
import math
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=wrong-import-position
from absl import app
from absl import flags
import numpy as np

from configs import lm_transformer
from input import text
from trainer.experiment import cli
from trainer import errors
from trainer.errors import UserError

flags.DEFINE_string('model_dir', '', 'A run of configs/lm_transformer.py (or '
                    "any 'lm' trainer config); empty: baselines of the "
                    'default config only.')
FLAGS = flags.FLAGS


def unigram_bits_per_byte(train: np.ndarray, targets: np.ndarray) -> float:
  """Mean -log2 p(byte) over `targets`, p fitted on `train` with add-one."""
  counts = np.bincount(train, minlength=text.VOCAB_SIZE) + 1.0
  log2_p = np.log2(counts / counts.sum())
  return float(-log2_p[targets.reshape(-1)].mean())


def read_run(model_dir: str):
  """(config dict, last held-out eval record or None) of a run."""
  path = os.path.join(model_dir, 'config.json')
  if not os.path.exists(path):
    raise UserError(f'flag --model_dir={model_dir!r} has no config.json; pass '
                    'the model_dir of a run of configs/lm_transformer.py')
  with open(path) as f:
    config = json.load(f)
  if config.get('trainer') != 'lm':
    raise UserError(f'flag --model_dir={model_dir!r} is a run of trainer='
                    f'{config.get("trainer")!r}, not a language model (lm)')
  split = config.get('eval', {}).get('split', 'test')
  record = None
  metrics = os.path.join(model_dir, 'eval', 'metrics.jsonl')
  if os.path.exists(metrics):
    records = []
    with open(metrics) as f:
      for line in f:
        with contextlib.suppress(ValueError):  # A line a crash cut short.
          records.append(json.loads(line))
    records = [r for r in records
               if isinstance(r, dict) and r.get('split') == split]
    record = records[-1] if records else None
  return config, record


def main(argv):
  del argv
  try:
    if FLAGS.model_dir:
      config, record = read_run(FLAGS.model_dir)
    else:
      config, record = lm_transformer.get_config().to_dict(), None
    source = text.Source.from_config(config['data'])
    seq_len = config['model']['seq_len']
    split = config.get('eval', {}).get('split', 'test')
    train = text.load_stream(source, 'train')
    targets = text.windows(text.check_length(source, split, seq_len),
                           seq_len)[:, 1:]
  except UserError as e:
    errors.fail(str(e))
  unigram = unigram_bits_per_byte(train, targets)
  print(f'held-out bytes scored: {targets.size:,} ({len(targets):,} windows '
        f'of {seq_len}); unigram fitted on {len(train):,} training bytes')
  print(f'{"uniform":<28} {8.0:.3f} bits/byte')
  print(f'{"unigram (add-one)":<28} {unigram:.3f} bits/byte')
  if not FLAGS.model_dir:
    return
  if record is None:
    errors.fail(f'flag --model_dir={FLAGS.model_dir!r} has no evaluation of '
             f'split {split!r} in eval/metrics.jsonl; run python main.py '
             f'--mode=eval --config=configs/lm_transformer.py '
             f'--model_dir={FLAGS.model_dir}')
  lm = record['bits_per_byte']
  if int(record.get('examples', -1)) != len(targets):
    print(f'note: the eval scored {int(record.get("examples", 0)):,} windows, '
          f'not {len(targets):,}: the data differs from this stream')
  print(f'{"LM at step " + str(record["step"]):<28} {lm:.3f} bits/byte '
        f'(accuracy {record.get("accuracy", math.nan):.3f})')
  print(f'{"LM / unigram":<28} {lm / unigram:.3f}')
  if not lm < unigram:
    print('the LM is not below the unigram: it has learned no context')
    sys.exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
