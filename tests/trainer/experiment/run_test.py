"""trainer/experiment/run.py end to end, in this process: what a mode
leaves in model_dir and returns."""

import json
import logging

from configs import digits_mlp
from trainer.experiment import run as experiment


def test_an_early_stop_is_evaluated_once(tmp_path, caplog):
  config = digits_mlp.get_config('smoke')
  config.train.steps = 60
  # The loss falls, so with best_mode='max' the first eval stays the best
  # and the second one (step 20) runs out of patience.
  config.eval.update(best_metric='loss', best_mode='max', patience=1)
  with caplog.at_level(logging.WARNING):
    metrics = experiment.run(config, model_dir=str(tmp_path),
                             strategy_name='default', mode='train_and_eval')
  lines = (tmp_path / 'eval' / 'metrics.jsonl').read_text().splitlines()
  records = [json.loads(line) for line in lines]
  # The final eval is the early stop's own: not a second line for step 20.
  assert [r['step'] for r in records] == [10, 20]
  assert metrics == {k: v for k, v in records[-1].items()
                     if k not in ('step', 'split')}
  assert caplog.text.count('early stop at step 20') == 1, caplog.text
  best = json.loads((tmp_path / 'best' / 'record.json').read_text())
  assert (best['step'], best['evals_since']) == (10, [20])
