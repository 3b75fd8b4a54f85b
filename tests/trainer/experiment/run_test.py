"""trainer/experiment/run.py end to end, in this process: what a mode
leaves in model_dir and returns."""

import json
import math
import logging

import pytest

from configs import digits_mlp
from tests import user_config
from tests.trainer.monitoring import summaries_test
from trainer.controller import NonFiniteLoss
from trainer.errors import UserError
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


@pytest.mark.parametrize('trainer, message, trained', [
    ('AggregateReturnsArray', r"^AggregateReturnsArray.aggregate returned "
     r"'predicted_all' of shape \[\d+, \d+\] and dtype int64: each value must "
     'be one number', True),
    ('AggregateRaises', r"^AggregateRaises.aggregate raised KeyError: "
     r"'prediction'$", True),
    # Tried on a training summary's keys before the run.
    ('DerivedMetricRaises', r'^DerivedMetricRaises.derived_metrics raised '
     r"KeyError: 'acuracy'$", False),
])
def test_a_mistake_in_a_host_metric_method_is_one_line(tmp_path, trainer,
                                                       message, trained):
  """aggregate and derived_metrics run on the host, after the final eval or
  at a training summary: their mistakes name them in one line (main.py:
  exit 2), not a traceback; the final checkpoint stays. derived_metrics is
  tried before the run: nothing is written."""
  config = user_config.get_config()
  config.trainer = f'tests.user_trainers:{trainer}'
  config.train.update(steps=4, steps_per_loop=2)
  with pytest.raises(UserError, match=message) as error:
    experiment.run(config, model_dir=str(tmp_path), strategy_name='default')
  assert '\n' not in str(error.value)
  assert (tmp_path / 'checkpoint').exists() == trained
  if not trained:
    assert not list(tmp_path.iterdir())


def test_a_metric_whose_weights_sum_to_0_is_nan_everywhere(tmp_path, caplog):
  """Training summaries, derived_metrics, the evaluation and its record all
  read NaN (it was left out of training summaries, where derived_metrics
  then failed, and 0 in evaluations, a perfect error rate); it is never
  the best checkpoint's value."""
  config = user_config.get_config()
  config.trainer = 'tests.user_trainers:ZeroWeightMetric'
  config.train.update(steps=8, steps_per_loop=2)
  config.eval.update(every_steps=4, best_metric='rated_error',
                     best_mode='min')
  metrics = experiment.run(config, model_dir=str(tmp_path),
                           strategy_name='default', mode='train_and_eval')
  assert math.isnan(metrics['rated_error'])
  assert math.isnan(metrics['rated_error_pct'])
  assert 0 < metrics['accuracy'] <= 1
  records = [json.loads(line) for line in
             (tmp_path / 'eval' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records] == [4, 8]
  assert all(math.isnan(r['rated_error']) for r in records)
  best = json.loads((tmp_path / 'best' / 'record.json').read_text())
  assert (best['value'], best['evals_since']) == (None, [4, 8]), best
  assert not list((tmp_path / 'best').glob('ckpt-*'))
  # A resumed run takes that record up as it is.
  config.train.steps = 12
  with caplog.at_level(logging.WARNING):
    experiment.run(config, model_dir=str(tmp_path), strategy_name='default',
                   mode='train_and_eval')
  assert 'cannot read' not in caplog.text
  best = json.loads((tmp_path / 'best' / 'record.json').read_text())
  assert (best['value'], best['evals_since']) == (None, [4, 8, 12]), best
  events = summaries_test.accumulator(tmp_path / 'train')
  for tag in ('metrics/rated_error', 'metrics/rated_error_pct'):
    values = summaries_test.scalar_series(events, tag)
    assert values and all(math.isnan(v) for _, v in values), (tag, values)


def test_derived_metrics_failing_on_made_up_values_still_trains(tmp_path):
  """The try of derived_metrics before the run uses made-up values (0.5):
  an arithmetic error there is the values', not a mistake, and the run
  trains (its summaries, every steps_per_loop by default, call it)."""
  config = user_config.get_config()
  config.trainer = 'tests.user_trainers:DerivedMetricOfValues'
  config.train.update(steps=4, steps_per_loop=2)
  metrics = experiment.run(config, model_dir=str(tmp_path),
                           strategy_name='default')
  assert (tmp_path / 'checkpoint').exists()
  assert metrics['log_gap'] == pytest.approx(
      math.log(abs(metrics['loss'] - 0.5)))


@pytest.mark.parametrize('replicas', [1, 2])
def test_eval_outputs_may_return_none(tmp_path, replicas):
  """eval_outputs returning None (its documented "none") gathers nothing:
  aggregate gets {}, the eval's other metrics are as usual."""
  config = user_config.get_config()
  config.trainer = 'tests.user_trainers:EvalOutputsOptional'
  config.train.update(steps=2, steps_per_loop=2)
  metrics = experiment.run(
      config, model_dir=str(tmp_path), num_cpu_devices=replicas,
      strategy_name='mirrored' if replicas > 1 else 'default')
  assert metrics['gathered_rows'] == 0
  assert metrics['examples'] > 0 and math.isfinite(metrics['loss'])


def test_a_nan_gradient_of_a_finite_loss_is_told_apart(tmp_path):
  """A NaN gradient of a finite loss at step 1 (sqrt at 0): the message says
  the loss was finite and where such a gradient comes from."""
  config = user_config.get_config()
  config.trainer = 'tests.user_trainers:NanGradient'
  config.train.update(steps=4, steps_per_loop=2)
  with pytest.raises(NonFiniteLoss) as error:
    experiment.run(config, model_dir=str(tmp_path), strategy_name='default')
  assert str(error.value) == (
      'non-finite gradient norm (the loss was finite) at step 1; the update '
      'was not applied and no checkpoint was written after it '
      '(train.nan_retries=0); no step was trained before it: look for NaN '
      'or Inf in the inputs, or an op whose gradient is infinite where its '
      'value is not (sqrt or log at 0; a NaN masked out of the loss with '
      'tf.where still gives a NaN gradient) (or set train.nan_retries)')


def test_a_changed_start_after_a_run_that_saved_nothing(tmp_path):
  """A first run that stopped before its first checkpoint (a NaN at step 1)
  wrote run.json, TensorBoard's config and hparams and goodput.json: a new
  start there with another Trainer (the fixed one, renamed) is refused, as
  it would mix the two runs in them, with the fix that loses nothing."""
  config = user_config.get_config()
  config.trainer = 'tests.user_trainers:NanLoss'
  config.train.update(steps=4, steps_per_loop=2)
  # Not 'lower the learning rate': no update has been made at step 1.
  with pytest.raises(NonFiniteLoss, match=r'^non-finite loss at step 1; '
                     r'.*\(train.nan_retries=0\); no step was trained '
                     'before it: look for NaN or Inf in the inputs or '
                     r'the loss \(or set train.nan_retries\)$'):
    experiment.run(config, model_dir=str(tmp_path), strategy_name='default')
  assert not list(tmp_path.glob('ckpt-*'))
  config.trainer = 'tests.user_trainers:SequenceTrainer'
  with pytest.raises(UserError) as error:
    experiment.run(config, model_dir=str(tmp_path), strategy_name='default')
  assert str(error.value) == (
      f'cannot resume --model_dir={tmp_path}: trainer: '
      "'tests.user_trainers:NanLoss' -> 'tests.user_trainers:SequenceTrainer' "
      'since the run started (run.json); it saved no checkpoint, so nothing '
      'is lost by starting over: use a new --model_dir, or remove this one')
  metrics = experiment.run(config, model_dir=str(tmp_path / 'new'),
                           strategy_name='default')
  assert metrics['examples'] > 0


def test_a_decorated_train_step_trains(tmp_path):
  config = user_config.get_config()
  config.trainer = 'tests.user_trainers:DecoratedTrainStep'
  config.train.update(steps=4, steps_per_loop=2)
  metrics = experiment.run(config, model_dir=str(tmp_path),
                           strategy_name='default')
  assert metrics['examples'] > 0
