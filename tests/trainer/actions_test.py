"""Host actions: cadences, chief-only, errors, and the summaries they write."""

import os
import signal
import threading
import time

import pytest

from tests.trainer.trainer_test import make_config, strategy_for
from trainer import actions as actions_lib
from trainer import schema
from trainer.controller import Controller, ControllerOptions
from trainer.errors import UserError
from trainer.monitoring import summaries
from trainer.persistence import checkpointing
from trainer.persistence import preemption
from models.classifier import ClassifierTrainer


def controller(tmp_path, actions, *, total_steps=24, is_chief=True,
               **options):
  trainer = ClassifierTrainer(config=make_config(), strategy=strategy_for(1))
  checkpointer = checkpointing.Checkpointer(trainer, str(tmp_path),
                                            async_save=False)
  train, evals = summaries.MemoryWriter(), summaries.MemoryWriter()
  return Controller(
      trainer=trainer, checkpointer=checkpointer, model_dir=str(tmp_path),
      total_steps=total_steps, steps_per_loop=10,
      options=ControllerOptions(**options), train_writer=train,
      eval_writer=evals,
      actions=actions_lib.Actions(actions, is_chief=is_chief)), train, evals


def test_each_cadence_runs_at_its_steps_and_cuts_inner_loops(tmp_path):
  seen = []

  def note(context):
    seen.append((context.event, context.step,
                 None if context.metrics is None else
                 round(context.metrics['accuracy'], 6)))
  actions = [actions_lib.Action(note, every_steps=7, name='every7'),
             actions_lib.Action(note, after_eval=True, name='evals'),
             actions_lib.Action(note, at_end=True, name='end')]
  ctl, _, _ = controller(tmp_path, actions, eval_every=12)
  ctl.train()
  metrics = ctl.evaluate()
  # Inner loops of 10 are cut to end on steps 7, 14, 21 (and 10, 20: evals
  # at 12 and 24 too).
  loop_ends = [step for step, _ in ctl.history]
  assert {7, 12, 14, 21, 24} <= set(loop_ends)
  steps = [(e, s) for e, s, _ in seen]
  assert steps == [('steps', 7), ('eval', 12), ('steps', 14), ('steps', 21),
                   ('end', 24), ('eval', 24)]
  assert seen[-1][2] == round(metrics['accuracy'], 6)  # Its eval's metrics.


def test_off_the_chief_only_everywhere_actions_run(tmp_path):
  seen = []
  actions = [actions_lib.Action(lambda c: seen.append('chief'), at_end=True,
                                name='chief_only'),
             actions_lib.Action(lambda c: seen.append('all'), at_end=True,
                                everywhere=True, name='everywhere')]
  ctl, _, _ = controller(tmp_path, actions, total_steps=10, is_chief=False)
  ctl.train()
  assert seen == ['all']


def test_an_action_that_raises_stops_the_run_in_one_line(tmp_path):
  def broken(context):
    raise KeyError('prompt')
  ctl, _, _ = controller(tmp_path, [actions_lib.Action(broken, every_steps=10)],
                         checkpoint_every=10)
  with pytest.raises(UserError, match=r"^action 'broken' \(steps at step 10\) "
                     r"raised KeyError: 'prompt'$"):
    ctl.train()
  # The checkpoint of that step was written, whole.
  assert checkpointing.checkpoint_paths(str(tmp_path))[-1].endswith('ckpt-10')
  assert checkpointing.is_complete(
      checkpointing.checkpoint_paths(str(tmp_path))[-1])


def test_on_preemption_actions_run_after_the_save(tmp_path):
  seen = []

  def flush(context):
    seen.append((context.step, sorted(os.listdir(context.model_dir))))
  ctl, _, _ = controller(
      tmp_path, [actions_lib.Action(flush, on_preemption=True)],
      total_steps=100000)
  threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
  with pytest.raises(preemption.Preempted):
    ctl.train()
  ((step, files),) = seen
  assert f'ckpt-{step}.index' in files  # Saved before the action ran.


def test_a_sigterm_stops_an_actions_evaluation_and_the_run_saves(tmp_path):
  """An action's trainer.evaluate() during training meets the stop request
  as a periodic evaluation does: it ends, the action with it, and the run
  saves and exits as preempted, not as the action's error."""
  seen = []

  def evaluate_other_split(context):
    os.kill(os.getpid(), signal.SIGTERM)
    while not context.trainer.stop_requested.numpy():  # The watcher's thread.
      time.sleep(0.01)
    seen.append('evaluating')
    context.trainer.evaluate('test')
    seen.append('evaluated')
  ctl, _, evals = controller(
      tmp_path, [actions_lib.Action(evaluate_other_split, every_steps=10),
                 actions_lib.Action(lambda c: seen.append('next'),
                                    every_steps=10, name='next')],
      total_steps=100, eval_every=10)
  with pytest.raises(preemption.Preempted) as raised:
    ctl.train()
  assert seen == ['evaluating', 'next']  # The next action still ran.
  assert raised.value.step == 10
  assert checkpointing.checkpoint_paths(str(tmp_path))[-1].endswith('ckpt-10')
  assert not ctl.evals and not evals.scalars  # The periodic one: not reported.
  # Training over, evaluations run to their end again.
  assert ctl.trainer.evaluate('test')['examples'] > 0


def test_a_sigterm_during_an_at_end_actions_evaluation_preempts(tmp_path):
  """After the last step, an at_end action's evaluation meets the stop
  request too; the run then exits as preempted, not as finished."""
  seen = []

  def evaluate_at_end(context):
    os.kill(os.getpid(), signal.SIGTERM)
    while not context.trainer.stop_requested.numpy():
      time.sleep(0.01)
    context.trainer.evaluate('test')
    seen.append('evaluated')
  ctl, _, _ = controller(
      tmp_path, [actions_lib.Action(evaluate_at_end, at_end=True)],
      total_steps=20)
  with pytest.raises(preemption.Preempted) as raised:
    ctl.train()
  assert not seen and raised.value.step == 20


def test_weight_histograms_from_the_config_and_images_through_the_writer(
    tmp_path):
  config = make_config()
  config.summary = dict(histograms_every_steps=8)
  (action,) = actions_lib.built_in(schema.resolve(config))
  ctl, train, _ = controller(tmp_path, [action])
  ctl.train()
  assert [step for step, _ in train.histograms] == [8, 16, 24]
  _, values = train.histograms[0]
  assert set(values) == {'weights/mlp/dense_0/kernel', 'weights/mlp/dense_0/bias',
                         'weights/mlp/dense_1/kernel', 'weights/mlp/dense_1/bias',
                         'weights/mlp/logits/kernel', 'weights/mlp/logits/bias'}
  assert values['weights/mlp/dense_0/kernel'].shape == (100, 16)


@pytest.mark.parametrize('kwargs, message', [
    (dict(), 'has no cadence'), (dict(every_steps=-1), 'every_steps=-1 must')])
def test_a_bad_action_is_one_line(kwargs, message):
  with pytest.raises(UserError, match=message):
    actions_lib.Action(lambda c: None, name='x', **kwargs)
  with pytest.raises(UserError, match='named x twice'):
    actions_lib.Actions([actions_lib.Action(lambda c: None, at_end=True,
                                            name='x')] * 2)
