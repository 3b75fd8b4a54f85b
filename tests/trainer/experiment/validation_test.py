"""Validate before writing: a Trainer's mistakes stop the run with one line
naming the method, before anything lands in model_dir."""

import logging
import os

import pytest
import tensorflow as tf

from tests import resume_test
from tests import runner
from tests import user_config
from configs import digits_mlp
from trainer.errors import UserError
from trainer.experiment import run as experiment
from trainer.persistence import preemption


def config(trainer='SequenceTrainer', **eval_keys):
  result = user_config.get_config('two_optimizers')
  result.trainer = f'tests.user_trainers:{trainer}'
  result.train.steps = 4
  result.train.steps_per_loop = 2
  result.eval.update(eval_keys)
  return result


@pytest.mark.parametrize('trainer, message', [
    ('ScalarLoss', r'ScalarLoss.compute_loss returned shape \[\], expected '
     r'\[32\]: one value per example'),
    # 'loss' is not compute_metrics': not listed as returned by it.
    ('MisnamedMetric', r"^MisnamedMetric.compute_metrics returned keys "
     r"\['accuracy'\] but the Trainer declares metric_names=\('acc',\); make "
     'compute_metrics return exactly metric_names$'),
    ('TrainStepWithoutReturn', r'^TrainStepWithoutReturn.train_step returned '
     r"None \(no return statement\?\); return \{'loss': per-example loss "
     r"\[B\], metric: per-example values \[B\]\} for "
     r"metric_names=\('accuracy',\)$"),
    # Saved only through the optimizer: --mode=eval evaluated random weights.
    ('LayersInAList', r'^Blocks \(from LayersInAList.build_model\) has '
     r'weights a checkpoint would not save \(blocks/dense.*/kernel, .*, '
     r'\.\.\.\): Keras 3 does not track layers kept in a list'),
    # Trained on no step and saved in no checkpoint, silently.
    # Neither trained nor saved.
    ('ScaleOutsideModel', r'^ScaleOutsideModel.scales holds trainable '
     r"tf.Variable\(s\) \(temperature:0\) that checkpoint_items\(\) does not "
     r"return: the default step trains only the model's weights, .*; make "
     r'them weights of the model, or, if a train_step of your own trains '
     r"them, add it there: items = super\(\).checkpoint_items\(model_only\), "
     r"then items\['scales'\] = self.scales"),
    ('LayerOutsideModel', r"^LayerOutsideModel.extra is a layer \('extra'\) "
     r'with trainable weights that checkpoint_items\(\) does not return: they '
     'would be neither saved nor restored.*, or set its trainable = False if '
     'it is frozen$'),
    ('ForwardWithoutReturn', r'^ForwardWithoutReturn.forward returned None '
     r'\(no return statement\?\); return the model.s outputs'),
    # The eval step's None was blamed on compute_loss, which received it.
    ('ForwardNoneInEval', r'^ForwardNoneInEval.forward returned None '
     r'\(no return statement\?\); return the model.s outputs'),
    ('DefaultForward', r"DefaultForward.dataset\('train'\) yields dict "
     r'batches \(keys labels, mask, tokens\) but DefaultForward keeps the '
     r'default forward'),
    ('FiniteTrainSplit', r"FiniteTrainSplit.dataset\('train'\) ends after 16 "
     r'batches, but the training stream must never end .*: add '
     r'.repeat\(\)'),
    ('EmptyEvalSplit', r"EmptyEvalSplit.dataset\('test'\) is empty"),
    ('RepeatedEvalSplit', r"^RepeatedEvalSplit.dataset\('test'\) repeats "
     'forever, but an evaluation reads its split to the end'),
    ('IgnoresBatchSize', r"IgnoresBatchSize.dataset\('train'\) gave a first "
     r'batch of 64 examples for batch_size=32 \(train.global_batch_size over '
     r'1 replica\(s\)\): batch by the batch_size argument'),
    ('RepeatsPartialBatches', r"^RepeatsPartialBatches.dataset\('train'\) has "
     r'no fixed batch size \(element\[labels\] \(None, 6\)\): a partial batch '
     r'at the end of an epoch would be trained as a full one .*'
     r'.batch\(batch_size, drop_remainder=True\)'),
    # Trained silently before: every second step's 8 examples as 32.
    ('PartialBatchEachEpoch', r"^PartialBatchEachEpoch.dataset\('train'\) "
     r'has no fixed batch size'),
    ('Unbatched', r"^Unbatched.dataset\('train'\) gave a first batch of 6 "
     r'examples for batch_size=32 .*: batch by the batch_size argument .* '
     r'with .batch\(batch_size, drop_remainder=True\) \(a dataset not batched '
     r'at all shows the first dimension of one example here\)$'),
    ('UnbatchedPairs', r"^UnbatchedPairs.dataset\('train'\) yields single "
     r'examples, not batches \(element\[1\] is a scalar\): batch them with '
     r'.batch\(batch_size, drop_remainder=True\)'),
    ('RaisesInComputeLoss', r'RaisesInComputeLoss.compute_loss raised '
     r"KeyError while the train step was traced: .*'labelz'"),
    ('RaisesInBuildModel', r'RaisesInBuildModel.build_model raised '
     'ValueError: width must be even, got 5'),
    # A traceback before: 'ForgetsSuperInit' object has no attribute ...
    ('ForgetsSuperInit', r'^ForgetsSuperInit.__init__ did not call '
     r'Trainer.__init__, which builds the model, optimizer and steps; start '
     r'it with super\(\).__init__\(config=config, strategy=strategy\) '
     r'\(or \*\*kwargs\)$'),
    ('ReadsMissingKey', r"ReadsMissingKey.build_model raised AttributeError: "
     r"config has no key 'model.use_bn'; add use_bn=... to the model section "
     r"of the config file's get_config\(\) \(--config.KEY=VALUE overrides "
     r'only keys the config has\)$'),
    ('ReadsMissingKeyInStep', r'ReadsMissingKeyInStep.compute_loss raised '
     r"AttributeError while the train step was traced: config has no key "
     r"'train.loss_weight'; add loss_weight=... to the model or data section "
     r"\(a Trainer's own keys go there; this one is not a framework key\) of "
     r"the config file's get_config\(\)"),
    ('LossWithoutReturn', r'^LossWithoutReturn.compute_loss returned None '
     r'\(no return statement\?\); return a tensor \[B\]'),
    ('MetricsAsList', r'^MetricsAsList.compute_metrics returned list, not a '
     'dict'),
    ('ModelIsALayer', r'^ModelIsALayer.build_model returned Dense, not a '
     r'tf.keras.Model; wrap a layer'),
    ('MetricNamesString', r"^MetricNamesString.metric_names='accuracy' must "
     r"be a tuple of names, e.g. \('accuracy',\)$"),
    ('NoComputeLoss', r'^NoComputeLoss does not define compute_loss, which '
     'every Trainer must'),
    # Found at the end of training before: a traceback from the gather.
    ('ScalarEvalOutput', r"^ScalarEvalOutput.eval_outputs returned shape \[\] "
     r"for 'mean_logit', expected \[B, \.\.\.\]: values are gathered along "
     'their first axis'),
    ('EvalOutputNotDict', r'^EvalOutputNotDict.eval_outputs returned .*Tensor, '
     r'not a dict; return \{name: per-example values \[B, \.\.\.\]\}'),
])
def test_mistakes_stop_the_run_before_model_dir_exists(tmp_path, trainer,
                                                      message):
  model_dir = tmp_path / 'run'
  with pytest.raises(UserError, match=message) as error:
    experiment.run(config(trainer), model_dir=str(model_dir),
                   strategy_name='default')
  assert '\n' not in str(error.value)
  assert not model_dir.exists()


def test_an_error_in_a_replicas_thread_is_not_logged_before_its_line(
    tmp_path, caplog):
  """Under mirrored, TensorFlow's coordinator logged the KeyError raised in
  a replica's thread, with its stack (~40 lines), before the one line."""
  with caplog.at_level(logging.INFO, logger='tensorflow'):
    with pytest.raises(UserError, match=r'^RaisesInComputeLoss.compute_loss '
                       r"raised KeyError while the train step was traced: "):
      experiment.run(config('RaisesInComputeLoss'), num_cpu_devices=2,
                     model_dir=str(tmp_path / 'run'), strategy_name='mirrored')
  assert 'labelz' not in caplog.text


def test_a_map_after_batch_that_loses_one_values_batch_size_trains(tmp_path):
  """Only a batch whose every value has an unknown first dimension (what
  .batch() without drop_remainder gives) is refused."""
  model_dir = tmp_path / 'run'
  experiment.run(config('MapLosesBatchDim'), model_dir=str(model_dir),
                 strategy_name='default')
  assert (model_dir / 'ckpt-4.index').exists()


@pytest.mark.parametrize('precision', ['mixed_bfloat16', 'mixed_float16'])
def test_a_step_of_your_own_under_mixed_precision_is_told_to_cast(
    tmp_path, precision):
  """self.forward returns 16-bit outputs there: the dtype error a float32
  loss meets names the cast, not just compute_loss."""
  model_dir = tmp_path / 'run'
  cfg = config('TutorialTrainer')
  cfg.train.precision = precision
  with pytest.raises(UserError, match=(
      r'^TutorialTrainer.compute_loss raised TypeError while the train step '
      r'was traced: .*float16.*; train.precision=.*: the model computes in 16 '
      r'bits .* a step of your own must cast them too: tf.cast\(outputs, '
      r'tf.float32\)$')):
    experiment.run(cfg, model_dir=str(model_dir), strategy_name='default')
  assert not model_dir.exists()


@pytest.mark.parametrize('trainer, replicas, message', [
    ('SecondOptimizerOutsideScope', 2, r'^SecondOptimizerOutsideScope.second '
     r'is an optimizer built outside self.strategy.scope\(\): one copy of its '
     r"state would serve every replica and the replicas' weights would drift "
     'apart'),
    ('SecondOptimizerNotCheckpointed', 1, r'^SecondOptimizerNotCheckpointed.'
     r'second is an optimizer that checkpoint_items\(\) does not return, so '
     'a resumed run would restart its state'),
], ids=['outside_scope', 'not_checkpointed'])
def test_a_second_optimizer_must_be_mirrored_and_checkpointed(
    tmp_path, trainer, replicas, message):
  """Either trains without an error: weights that differ between replicas
  (check_replicas finds them), a resume that is not exact."""
  model_dir = tmp_path / 'run'
  with pytest.raises(UserError, match=message):
    experiment.run(config(trainer), model_dir=str(model_dir),
                   strategy_name='mirrored', num_cpu_devices=replicas)
  assert not model_dir.exists()


@pytest.mark.parametrize('trainer', ['SigtermInBuildModel',
                                     'SigtermInDataset'])
def test_a_sigterm_in_user_code_is_a_preemption_not_a_mistake(
    tmp_path, trainer, sigterm_guard):
  """Raised inside code whose errors become one-line UserErrors (exit 2,
  never retried), the preemption still comes out as one (exit 42)."""
  del sigterm_guard
  model_dir = tmp_path / 'run'
  with pytest.raises(preemption.Preempted, match='^preempted by SIGTERM'):
    experiment.run(config(trainer), model_dir=str(model_dir),
                   strategy_name='default')
  assert not model_dir.exists()


@pytest.mark.parametrize('pipeline', ['per_host', 'global'])
def test_datasets_are_checked_as_the_run_calls_them(tmp_path, pipeline):
  """A dataset that batches by its input context (TensorFlow's idiom) passes
  the check on 2 replicas under either pipeline, and trains."""
  settings = config('BatchesByContext')
  settings.data.pipeline = pipeline
  metrics = experiment.run(settings, model_dir=str(tmp_path / 'run'),
                           strategy_name='mirrored', num_cpu_devices=2)
  assert metrics['examples'] > 0


def test_an_unknown_eval_split_stops_a_resumed_run_untouched(tmp_path):
  model_dir = tmp_path / 'run'
  experiment.run(config(), model_dir=str(model_dir), strategy_name='default')
  before = resume_test.snapshot(model_dir)
  longer = config(split='validation')
  longer.train.steps = 8  # A resume with more steps would write.
  with pytest.raises(UserError, match=r"SequenceTrainer.dataset\('validation'"
                     r"\) raised ValueError: no split 'validation'.*config "
                     r"key eval.split='validation'"):
    experiment.run(longer, model_dir=str(model_dir), strategy_name='default')
  assert resume_test.snapshot(model_dir) == before


@pytest.mark.parametrize('strategy', [(), ('--strategy=mirrored',
                                             '--num_cpu_devices=2')],
                         ids=['default', 'mirrored'])
def test_main_reports_a_mistake_in_one_line_with_exit_2(tmp_path, strategy):
  """Under MirroredStrategy too, where TensorFlow's coordinator would log
  the error of a replica's thread with its stack first."""
  model_dir = tmp_path / 'run'
  result = runner.run_main('--config=tests/user_config.py',
                           '--config.trainer=tests.user_trainers:ScalarLoss',
                           f'--model_dir={model_dir}', *strategy)
  assert result.returncode == 2, result.stderr[-2000:]
  errors = runner.error_lines(result.stderr)
  assert len(errors) == 1 and 'ScalarLoss.compute_loss returned' in errors[0]
  assert 'Traceback' not in result.stderr
  assert not model_dir.exists()


def test_the_validated_trace_is_the_one_training_uses(tmp_path):
  """Validation traces the loops once; training adds no second trace."""
  traces = {}
  original = experiment.controller_lib.Controller.train

  def train(controller):
    result = original(controller)
    traces.update(controller.trainer.trace_counts)
    return result

  experiment.controller_lib.Controller.train = train
  try:
    experiment.run(config(), model_dir=str(tmp_path / 'run'),
                   strategy_name='default')
  finally:
    experiment.controller_lib.Controller.train = original
  assert traces['train_loop'] == 1 and traces['eval_loop'] == 1


def test_an_unwritable_model_dir_is_refused_once_validated(tmp_path):
  """Past main.py's early check (a caller of run(), or a directory that
  changed since): the write probe refuses it, and nothing is touched."""
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  with pytest.raises(UserError, match=r"flag --model_dir='.*/file/run' is not "
                     r'a writable directory \(Not a directory\)'):
    experiment.run(config(), model_dir=str(blocker / 'run'),
                   strategy_name='default')
  assert blocker.read_text() == 'not a directory'
  assert os.listdir(tmp_path) == ['file']


def test_a_train_split_that_runs_out_unseen_is_one_line(tmp_path):
  long = config('EndsUnseen')
  long.train.steps = 40  # 512 examples in batches of 32: 16 steps of data.
  with pytest.raises(UserError, match=r"EndsUnseen.dataset\('train'\) ran out "
                     r'of data after step 16 of 40: .*add .repeat\(\)'):
    experiment.run(long, model_dir=str(tmp_path / 'run'),
                   strategy_name='default')


def test_evaluating_needs_only_the_eval_batch_to_divide(tmp_path):
  """A run trained with a batch of 30 on one device is evaluated and
  exported on 4 replicas (eval batch 32); only training there is refused."""
  model_dir = str(tmp_path / 'run')
  settings = config()
  settings.train.global_batch_size = 30
  settings.eval.global_batch_size = 32
  trained = experiment.run(settings, model_dir=model_dir,
                           strategy_name='default')
  evaluated = experiment.run(settings, model_dir=model_dir, mode='eval',
                             strategy_name='mirrored', num_cpu_devices=4)
  assert evaluated['examples'] == trained['examples']
  assert evaluated['loss'] == pytest.approx(trained['loss'], rel=1e-5)
  exported = experiment.run(settings, model_dir=model_dir, mode='export',
                            strategy_name='mirrored', num_cpu_devices=4)
  assert os.path.isdir(exported['export'])
  with pytest.raises(UserError, match=r'cannot resume .* with '
                     r'train.global_batch_size=30, which does not divide by '
                     r'4 replicas'):
    experiment.run(settings, model_dir=model_dir, mode='train',
                   strategy_name='mirrored', num_cpu_devices=4)


@pytest.mark.parametrize('trainer, message', [
    ('WrongInputWidth', r"^WrongInputWidth.forward \(the default\) raised "
     r'ValueError while the train step was traced: Input 0 .* incompatible '
     r'.*expected axis -1 of input shape to have value 63, but received input '
     r'with shape \(64, 64\)$'),
    ('SignatureNotAList', r'^SignatureNotAList.serving_input_signature '
     r'returned TensorSpec\(.*\); return a list of tf.TensorSpec'),
    # Blamed on serve alone before.
    ('SignatureTooNarrow', r'^SignatureTooNarrow.serve \(the default\) raised '
     r'ValueError while the serving function was traced: .*expected axis -1 '
     r'of input shape to have value 64.* \(serve was traced with the inputs '
     r'SignatureTooNarrow.serving_input_signature\(\) gives: x \(None, 4\) '
     r'float32\)$'),
    ('SignatureFewerThanServe', r'^SignatureFewerThanServe.serving_input_'
     r'signature returned 1 TensorSpec\(s\) but SignatureFewerThanServe.serve '
     r'takes 2 input\(s\) \(features, scale\): return one spec per input '
     r'of serve, in its order$'),
    ('SignatureMoreThanServe', r'^SignatureMoreThanServe.serving_input_'
     r'signature returned 2 TensorSpec\(s\) but SignatureMoreThanServe.serve '
     r'takes 1 input\(s\) \(features\): return one spec'),
    # TensorFlow would export it as output_0 and output_1.
    ('ServeReturnsTuple', r"^ServeReturnsTuple.serve returned a tuple; return "
     r"a dict of tensors, e.g. \{'prediction': self.model\(features, "
     r"training=False\)\}: its keys name the outputs of the exported "
     r'signature$'),
    # Refused by TensorFlow too, but only when the export saves it.
    ('ServeReturnsNestedDict', r'^ServeReturnsNestedDict.serve returned a '
     r'dict that is empty or not \{str: tensor\}; return a dict of tensors'),
])
def test_a_model_that_does_not_fit_stops_the_run(tmp_path, trainer, message):
  settings = digits_mlp.get_config('smoke')
  settings.trainer = f'tests.user_trainers:{trainer}'
  settings.export = dict(at_end=True)
  model_dir = tmp_path / 'run'
  with pytest.raises(UserError, match=message):
    experiment.run(settings, model_dir=str(model_dir),
                   strategy_name='default')
  assert not model_dir.exists()


def exported_signature(tmp_path, trainer: str):
  """serving_default of a 2-step digits run of `trainer`, export.at_end."""
  settings = digits_mlp.get_config('smoke')
  settings.trainer = f'tests.user_trainers:{trainer}'
  settings.train.steps = 2
  settings.export = dict(at_end=True)
  result = experiment.run(settings, model_dir=str(tmp_path / 'run'),
                          strategy_name='default')
  return tf.saved_model.load(result['export']).signatures['serving_default']


def test_a_ragged_serving_output_is_exported(tmp_path):
  """The check of serve's outputs lets through what a SavedModel signature
  can return: a ragged tensor, exported and served."""
  serve = exported_signature(tmp_path, 'ServeReturnsRagged')
  top = serve(input_0=tf.zeros([3, 64]))['top']
  assert isinstance(top, tf.RaggedTensor) and top.shape[0] == 3


def test_a_two_headed_model_is_exported_by_the_default_serve(tmp_path):
  """Its dict of outputs is the signature's (the default serve no longer
  nests it under 'outputs', which the export refused)."""
  serve = exported_signature(tmp_path, 'TwoHeadsDefaultServe')
  served = serve(input_0=tf.zeros([3, 64]))
  assert {k: v.shape.as_list() for k, v in served.items()} == {
      'logits': [3, 10], 'score': [3, 1]}


@pytest.mark.parametrize('trainer', ['KeepsEncoderView', 'FrozenTeacher'])
def test_layers_kept_beside_the_model_that_lose_nothing_pass(tmp_path,
                                                            trainer):
  """The check of layers kept on the Trainer goes by their trainable
  weights: a view of the model's own layers and a frozen layer train."""
  settings = config(trainer)
  experiment.run(settings, model_dir=str(tmp_path), strategy_name='default')
  assert (tmp_path / 'checkpoint').exists()


def test_a_variable_the_step_changes_outside_the_checkpoint_is_warned_about(
    tmp_path, caplog):
  """A running mean the step updates and forward reads: trained with, then
  lost (a resume or --mode=eval reads 0). Not trainable, so it may as well
  be a constant (class weights): a warning, not a refusal."""
  with caplog.at_level(logging.WARNING, logger='absl'):
    experiment.run(config('RunningMeanOutsideCheckpoint'),
                   model_dir=str(tmp_path), strategy_name='default')
  assert ("RunningMeanOutsideCheckpoint.input_mean holds tf.Variable(s) "
          "(Variable:0) that checkpoint_items() does not return: if your step "
          'changes them, a resumed run, --mode=eval and the export will see '
          "their initial values; if so, add it there: items = "
          "super().checkpoint_items(model_only), then items['input_mean'] = "
          'self.input_mean') in caplog.text


def test_a_variable_returned_by_checkpoint_items_is_saved_and_evaluated_with(
    tmp_path):
  """What the refusal above asks for works: --mode=eval restores the
  running mean and gives the training run's own final eval."""
  settings = config('RunningMeanCheckpointed')
  trained = experiment.run(settings, model_dir=str(tmp_path),
                           strategy_name='default')
  evaluated = experiment.run(settings, model_dir=str(tmp_path), mode='eval',
                             strategy_name='default')
  assert evaluated == trained and trained['loss'] > 0
  assert tf.train.load_checkpoint(str(tmp_path)).get_tensor(
      'input_mean/.ATTRIBUTES/VARIABLE_VALUE') != 0


@pytest.mark.parametrize('replicas', [1, 2])
def test_dropouts_seed_state_counts_as_saved(tmp_path, replicas):
  """Dropout's SeedGenerator state is a weight of the model that the
  checkpoint saves beside it (as 'rng'), not under 'model': the check of
  unsaved weights lets it through."""
  settings = digits_mlp.get_config('smoke')
  settings.model.dropout = 0.2
  settings.train.steps = 2
  experiment.run(settings, model_dir=str(tmp_path), num_cpu_devices=replicas,
                 strategy_name='mirrored' if replicas > 1 else 'default')
  assert (tmp_path / 'checkpoint').exists()
