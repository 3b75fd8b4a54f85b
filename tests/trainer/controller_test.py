"""Controller: loop boundaries, NaN guard and recovery, best checkpoint, SIGTERM."""

import contextlib
import json
import logging
import os
import re
import signal
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from models.classifier import ClassifierTrainer
from tests import user_trainers
from tests.trainer.trainer_test import make_config, strategy_for
from trainer.persistence import best as best_lib
from trainer.persistence import checkpointing
from trainer.experiment import continuous_eval
from trainer.persistence import preemption
from trainer.monitoring import summaries
from trainer.controller import Controller, ControllerOptions, NonFiniteLoss

NAN_AT = 13  # 1-based step whose batch is poisoned.


class PoisonedTrainer(ClassifierTrainer):
  """Feeds NaN features in the nan_at-th training batch of the pipeline."""
  nan_at = NAN_AT

  def dataset(self, split, input_context, batch_size):
    dataset = super().dataset(split, input_context, batch_size)
    if split != 'train':
      return dataset

    def poison(index, batch):
      features, labels = batch
      bad = tf.fill(tf.shape(features), float('nan'))
      return tf.where(index == self.nan_at - 1, bad, features), labels
    return dataset.enumerate().map(poison)


def build(config, trainer_cls=ClassifierTrainer, replicas=1):
  tf.keras.utils.set_random_seed(config.seed)
  return trainer_cls(config=config, strategy=strategy_for(replicas))


def controller_for(trainer, model_dir, total_steps, steps_per_loop=5,
                   **options):
  checkpointer = checkpointing.Checkpointer(trainer, str(model_dir),
                                            max_to_keep=50)
  return Controller(trainer=trainer, checkpointer=checkpointer,
                    model_dir=str(model_dir), total_steps=total_steps,
                    steps_per_loop=steps_per_loop,
                    options=ControllerOptions(**options))


def saved_steps(model_dir):
  return [int(p.rsplit('-', 1)[1])
          for p in checkpointing.checkpoint_paths(str(model_dir))]


def test_loops_end_on_checkpoint_and_eval_boundaries(tmp_path):
  trainer = build(make_config())
  controller = controller_for(trainer, tmp_path, total_steps=24,
                              steps_per_loop=5, checkpoint_every=7,
                              eval_every=10)
  controller.train()
  assert [step for step, _ in controller.history] == [
      5, 7, 10, 14, 19, 20, 21, 24]
  assert saved_steps(tmp_path) == [7, 14, 21, 24]
  assert [step for step, _ in controller.evals] == [10, 20]
  assert int(trainer.data_position.numpy()) == 24


@pytest.mark.parametrize('clip_norm, advice', [
    (0.0, ' or enable train.clip_norm'),
    (1e6, '')])  # Set: not advised again.
def test_nan_step_stops_without_update_and_keeps_checkpoint(
    tmp_path, clip_norm, advice):
  config = make_config(clip_norm=clip_norm)
  trainer = build(config, PoisonedTrainer)
  controller = controller_for(trainer, tmp_path, total_steps=30,
                              checkpoint_every=10)
  # NaN features: the inputs are named as a cause.
  with pytest.raises(NonFiniteLoss, match=rf'at step {NAN_AT}; .*'
                     r'\(train.nan_retries=0\); look for NaN or Inf in the '
                     r'inputs of that batch, or lower the learning rate'
                     rf'{advice} \(or set train.nan_retries\)$'):
    controller.train()
  controller.checkpointer.wait()
  assert saved_steps(tmp_path) == [10]
  assert int(trainer.global_step.numpy()) == NAN_AT - 1
  # The poisoned update was skipped: weights equal a clean run of NAN_AT - 1
  # steps, and are finite.
  clean = build(config)
  clean.model.set_weights(build(config, PoisonedTrainer).model.get_weights())
  controller_for(clean, tmp_path / 'clean', total_steps=NAN_AT - 1).train()
  for a, b in zip(trainer.model.get_weights(), clean.model.get_weights()):
    assert np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)


def test_a_failed_run_finishes_the_checkpoint_write_in_flight(tmp_path):
  """main.py exits a failed run with os._exit, which would cut a background
  write short: Controller.train waits for it before the error leaves."""
  trainer = build(make_config(), PoisonedTrainer)
  controller = controller_for(trainer, tmp_path, total_steps=30,
                              checkpoint_every=5)
  writes = controller.checkpointer._writes  # pylint: disable=protected-access
  write = writes._write_and_call_back  # pylint: disable=protected-access

  def slow_write(*args):
    time.sleep(0.5)
    write(*args)
  writes._write_and_call_back = slow_write  # pylint: disable=protected-access
  with pytest.raises(NonFiniteLoss, match=f'at step {NAN_AT};'):
    controller.train()
  # ckpt-5 was the first (synchronous) save, ckpt-10 an async one.
  assert saved_steps(tmp_path) == [5, 10]
  assert tf.train.latest_checkpoint(str(tmp_path)).endswith('ckpt-10')


def test_a_sigterm_during_the_last_write_keeps_it(tmp_path, sigterm_guard):
  """A SIGTERM while the final checkpoint is being written: the write
  completes and the Preempted error names it (the exit after would cut a
  write in flight)."""
  del sigterm_guard
  trainer = build(make_config())
  controller = controller_for(trainer, tmp_path, total_steps=10,
                              checkpoint_every=5)
  writes = controller.checkpointer._writes  # pylint: disable=protected-access
  write = writes._write_and_call_back  # pylint: disable=protected-access

  def slow_write(*args):
    if int(trainer.global_step.numpy()) == 10:
      time.sleep(0.5)  # Training is over: train() waits for this write.
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(1)
    write(*args)
  writes._write_and_call_back = slow_write  # pylint: disable=protected-access
  with pytest.raises(preemption.Preempted,
                     match=f'saved {tmp_path}/ckpt-10 at step 10;'):
    controller.train()
  assert saved_steps(tmp_path) == [5, 10]
  assert checkpointing.is_complete(str(tmp_path / 'ckpt-10'))


def test_a_sigterm_while_waiting_for_a_write_is_raised_after_it(
    tmp_path, sigterm_guard):
  del sigterm_guard
  trainer = build(make_config())
  checkpointer = checkpointing.Checkpointer(trainer, str(tmp_path))
  checkpointer.save()  # The first save traces the writer and is in line.
  writes = checkpointer._writes  # pylint: disable=protected-access
  write = writes._write_and_call_back  # pylint: disable=protected-access

  def slow_write(*args):
    time.sleep(1)
    write(*args)
  writes._write_and_call_back = slow_write  # pylint: disable=protected-access
  trainer.global_step.assign(1)
  checkpointer.save()
  threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
  with pytest.raises(preemption.Preempted):
    checkpointer.wait()
  assert checkpointing.is_complete(str(tmp_path / 'ckpt-1'))


def test_nan_step_is_caught_on_two_replicas(tmp_path):
  # With 2 replicas the poisoned batch index is per pipeline batch, i.e. step
  # ceil(NAN_AT / 2); only one replica sees NaN, and both must stop.
  trainer = build(make_config(), PoisonedTrainer, replicas=2)
  controller = controller_for(trainer, tmp_path, total_steps=30)
  with pytest.raises(NonFiniteLoss, match=f'at step {(NAN_AT + 1) // 2};'):
    controller.train()
  assert all(np.all(np.isfinite(w)) for w in trainer.model.get_weights())


class PoisonedTutorialTrainer(user_trainers.TutorialStep, PoisonedTrainer):
  """The tutorial step (its own tape and optimizer call), with the NaN in
  the second replica's batch of step 7 only."""
  nan_at = 14


class MaskedLossTutorialTrainer(PoisonedTutorialTrainer):
  """Masks non-finite per-example losses to 0, as users do: the loss stays
  finite while the gradient (through tf.where) is NaN."""

  def compute_loss(self, batch, outputs):
    loss = super().compute_loss(batch, outputs)
    return tf.where(tf.math.is_finite(loss), loss, 0.0)


@pytest.mark.parametrize('trainer_cls, replicas, what', [
    # A NaN input can give a finite loss: oneDNN's fused MatMul+BiasAdd+Relu
    # turns it into 0 on some CPUs (trainer/parts/status.py).
    (PoisonedTutorialTrainer, 2, r'(loss|weights \(the loss was finite\))'),
    (MaskedLossTutorialTrainer, 1, r'weights \(the loss was finite\)'),
    (MaskedLossTutorialTrainer, 2, r'weights \(the loss was finite\)')],
                         ids=['nan_loss', 'masked_1', 'masked_2'])
def test_a_tutorial_step_stops_every_replica_at_the_nan_step(
    tmp_path, trainer_cls, replicas, what):
  """Judged by the first replica alone, or by a (masked) finite loss
  alone, step 7 looked fine, and the NaN weights it made were only seen at
  step 8: the weights the step's own update left are checked too."""
  trainer = build(make_config(), trainer_cls, replicas=replicas)
  trainer.nan_at = 7 * replicas  # Step 7, the last replica's batch.
  controller = controller_for(trainer, tmp_path, total_steps=30)
  with pytest.raises(NonFiniteLoss, match=rf'^non-finite {what} at step 7; '
                     r'no checkpoint was written after it'):
    controller.train()
  assert controller.step == 6


@pytest.mark.parametrize('nan_retries', [0, 1])
def test_no_progress_line_shows_the_rejected_step(tmp_path, caplog,
                                                  nan_retries):
  """The inner loop that ended at the NaN step (13) was logged as
  'step 12/20: loss=nan', as if steps 1-12 had diverged; rolled back or
  stopped, it is not logged, and the next line is of steps trained again."""
  trainer = build(make_config(), PoisonedTrainer)
  controller = controller_for(trainer, tmp_path, total_steps=20,
                              checkpoint_every=10, nan_retries=nan_retries)
  with caplog.at_level(logging.INFO, logger='absl'):
    with pytest.raises(NonFiniteLoss) if not nan_retries else (
        contextlib.nullcontext()):
      controller.train()
  lines = re.findall(r'step (\d+)/20: loss=(\S+)', caplog.text)
  assert [step for step, _ in lines] == (
      ['5', '10', '15', '20'] if nan_retries else ['5', '10'])
  assert all(np.isfinite(float(loss)) for _, loss in lines), lines


class PoisonedCountingTrainer(PoisonedTrainer):
  """Counts its training examples in a streaming metric."""

  def build_streaming_metrics(self):
    return {'examples_seen': tf.keras.metrics.Sum()}

  def update_streaming_metrics(self, metrics, batch, outputs):
    metrics['examples_seen'].update_state(
        tf.cast(tf.shape(batch[1])[0], tf.float32))


def test_nan_recovery_drops_the_rolled_back_steps_from_streaming_metrics(
    tmp_path):
  trainer = build(make_config(), PoisonedCountingTrainer)
  writer = summaries.MemoryWriter()
  controller = Controller(
      trainer=trainer, checkpointer=checkpointing.Checkpointer(
          trainer, str(tmp_path)), model_dir=str(tmp_path), total_steps=20,
      steps_per_loop=5, train_writer=writer, options=ControllerOptions(
          checkpoint_every=10, summary_every=10, nan_retries=1))
  controller.train()
  # Steps 11-13 (13 failed) were rolled back to step 10; the summary at
  # step 20 covers steps 11-20 as trained again, like the loss beside it.
  assert writer.steps() == [10, 20]
  batch = trainer.global_batch_size
  assert [v['metrics/examples_seen'] for _, v in writer.scalars] == [
      10 * batch, 10 * batch]


def test_nan_recovery_restores_and_skips_the_bad_batch(tmp_path):
  trainer = build(make_config(), PoisonedTrainer)
  controller = controller_for(trainer, tmp_path, total_steps=30,
                              checkpoint_every=10, nan_retries=1)
  controller.train()
  assert int(trainer.global_step.numpy()) == 30
  # Restored to step 10 at data position 13 (past the bad batch): 3 batches
  # were skipped in all.
  assert int(trainer.data_position.numpy()) == 33
  assert all(np.all(np.isfinite(w)) for w in trainer.model.get_weights())


def test_nan_recovery_gives_up_after_retries(tmp_path):
  config = make_config()
  config.optimizer.learning_rate = 1e30  # Diverges at every retry.
  trainer = build(config)
  controller = controller_for(trainer, tmp_path, total_steps=50,
                              checkpoint_every=1, nan_retries=2)
  with pytest.raises(NonFiniteLoss) as e:
    controller.train()
  # The retries were used up: no advice to set the key the user has set.
  assert re.fullmatch(
      r'non-finite (loss|gradient norm \(the loss was finite\)) at step \d+ '
      r'after 2 retries; the '
      r'update was not applied and no checkpoint was written after it '
      r'\(train.nan_retries=2\); look for NaN or Inf in the inputs of that '
      r'batch, or lower the learning rate or enable train.clip_norm',
      str(e.value)), str(e.value)


def test_best_checkpoint_and_early_stopping(tmp_path, monkeypatch):
  trainer = build(make_config())
  controller = controller_for(trainer, tmp_path, total_steps=100,
                              eval_every=5, best_metric='accuracy',
                              best_mode='max', patience=2)
  scripted = iter([0.5, 0.7, 0.6, 0.65, 0.9])

  def evaluate():
    metrics = {'accuracy': next(scripted), 'loss': 1.0, 'examples': 10}
    controller.evals.append((controller.step, metrics))
    return metrics
  monkeypatch.setattr(controller, 'evaluate', evaluate)
  controller.train()
  # Evals at 5, 10, 15, 20: best 0.7 at step 10, then two worse -> stop.
  assert controller.step == 20
  record = json.loads((tmp_path / 'best' / 'record.json').read_text())
  assert record == {'metric': 'accuracy', 'mode': 'max', 'value': 0.7,
                    'step': 10, 'checkpoint': 'ckpt-10',
                    'evals_since': [15, 20]}
  assert saved_steps(tmp_path / 'best') == [10]
  assert saved_steps(tmp_path)[-1] == 20  # Final save after the early stop.


def scripted_controller(model_dir, monkeypatch, accuracies, **options):
  """A controller over model_dir (restored from its last checkpoint, as a
  restarted run is) whose evals return `accuracies` in turn."""
  trainer = build(make_config())
  controller = controller_for(trainer, model_dir, eval_every=5,
                              checkpoint_every=10, best_metric='accuracy',
                              best_mode='max', **options)
  controller.checkpointer.restore_latest()
  scripted = iter(accuracies)

  def evaluate():
    metrics = {'accuracy': next(scripted), 'loss': 1.0, 'examples': 10}
    controller.evals.append((controller.step, metrics))
    summaries.append_eval_record(str(model_dir), {
        'step': controller.step, 'split': 'test', **metrics})
    return metrics
  monkeypatch.setattr(controller, 'evaluate', evaluate)
  return controller


@pytest.mark.parametrize('record', ['kept', 'lost', 'torn'])
def test_a_restart_at_an_eval_step_evaluates_it_first_unless_recorded(
    tmp_path, monkeypatch, caplog, record):
  """Killed during the evaluation at step 10, after its checkpoint: no line
  in eval/metrics.jsonl (or half of one), so the restart evaluates step 10
  before it trains on; with the line there it does not."""
  caplog.set_level(logging.INFO, logger='absl')
  first = scripted_controller(tmp_path, monkeypatch, [0.5, 0.9],
                              total_steps=15)
  first.train()
  checkpointing.remove(str(tmp_path / 'ckpt-15'))  # Killed before it.
  path = tmp_path / 'eval' / 'metrics.jsonl'
  lines = path.read_text().splitlines()
  assert [json.loads(l)['step'] for l in lines] == [5, 10]
  if record == 'lost':
    path.write_text(lines[0] + '\n')
  elif record == 'torn':
    path.write_text(lines[0] + '\n' + lines[1][:20])
  second = scripted_controller(tmp_path, monkeypatch, [0.7, 0.8, 0.6],
                               total_steps=20)
  assert second.step == 10
  second.train()
  evaluated = [step for step, _ in second.evals]
  message = ('the evaluation at step 10 did not finish before the restart: '
             'evaluating it first')
  if record == 'kept':
    assert evaluated == [15] and message not in caplog.text
  else:
    assert evaluated == [10, 15] and message in caplog.text
  steps = []
  for line in path.read_text().splitlines():
    with contextlib.suppress(ValueError):
      steps.append(json.loads(line)['step'])
  assert steps == [5, 10, 15]  # The torn half is a line of its own.


def test_the_best_and_patience_outlive_a_restart(tmp_path, monkeypatch,
                                                 caplog):
  first = scripted_controller(tmp_path, monkeypatch, [0.5, 0.9, 0.6],
                              total_steps=15, patience=3)
  first.train()  # Best 0.9 at step 10, one worse eval at 15.
  # Pretend it died after the eval at 15, before its checkpoint: the
  # restart resumes at 10 and evaluates 15 again.
  checkpointing.remove(str(tmp_path / 'ckpt-15'))
  second = scripted_controller(tmp_path, monkeypatch, [0.8, 0.7, 0.6, 0.6],
                               total_steps=40, patience=3)
  assert second.step == 10
  second.train()
  second.evaluate_and_track()  # The final eval, as run.py makes it.
  # 0.8 at 15 is no new best: the record is kept. Patience counts 15, 20,
  # 25 (the lost eval at 15 only once) and stops there.
  assert second.step == 25
  record = json.loads((tmp_path / 'best' / 'record.json').read_text())
  assert (record['value'], record['step'], record['evals_since']) == (
      0.9, 10, [15, 20, 25])
  assert saved_steps(tmp_path / 'best') == [10]
  # The same command again: it stays stopped.
  third = scripted_controller(tmp_path, monkeypatch, [], total_steps=40,
                              patience=3)
  assert third.train() == {} and third.step == 25
  assert 'already stopped early at step 25: accuracy has not improved on 0.9 ' \
      '(step 10) for 3 evals (eval.patience=3); nothing to train' in caplog.text
  # With more patience it trains on, and a new best replaces the old one.
  fourth = scripted_controller(tmp_path, monkeypatch, [0.95], total_steps=35,
                               patience=4)
  fourth.train()
  record = json.loads((tmp_path / 'best' / 'record.json').read_text())
  assert (record['value'], record['step'], record['evals_since']) == (
      0.95, 30, [])
  assert saved_steps(tmp_path / 'best') == [30]


def test_patience_runs_out_on_a_metric_that_never_had_a_value(tmp_path,
                                                              caplog):
  """Every eval NaN (its weights summed to 0): no best, an early stop that
  says so, and a restart that stays stopped."""
  def best():
    return best_lib.BestCheckpoint(str(tmp_path / 'best'), metric='mae',
                                   mode='min', patience=2)
  first = best()
  with caplog.at_level(logging.WARNING):
    assert not first.track(None, 10, {'mae': float('nan')})
    assert first.track(None, 20, {'mae': float('nan')})
    assert best().stopped_early(20)
  assert 'Logging error' not in caplog.text
  # Each NaN is said, not only the early stop it leads to.
  assert ('eval.best_metric=mae is NaN at step 10 (its weights summed to 0 '
          'over the split): not a best checkpoint; best/ keeps none yet'
          ) in caplog.text
  assert ('early stop at step 20: mae has not improved on NaN (no evaluation '
          'has had a value) for 2 evals') in caplog.text
  assert 'already stopped early at step 20: mae has not improved on NaN' in (
      caplog.text)
  record = json.loads((tmp_path / 'best' / 'record.json').read_text())
  assert record == {'metric': 'mae', 'mode': 'min', 'value': None,
                    'step': None, 'checkpoint': None, 'evals_since': [10, 20]}


def test_every_worker_reads_the_jobs_record_and_a_replay_counts_nothing(
    tmp_path):
  """A worker other than the chief writes its best/ privately but takes up
  the job's record, as the chief does. A restart from before the best
  (killed after it, resumed from an older checkpoint) recomputes evals the
  run that found the best did not count against it."""
  job = tmp_path / 'model_dir' / 'best'
  job.mkdir(parents=True)
  (job / 'record.json').write_text(json.dumps(
      {'metric': 'accuracy', 'mode': 'max', 'value': 0.9, 'step': 1500,
       'checkpoint': 'ckpt-1500', 'evals_since': []}))
  best = best_lib.BestCheckpoint(str(tmp_path / 'own' / 'best'),
                                 metric='accuracy', mode='max', patience=1,
                                 read_from=str(job))
  assert not best.stopped_early(1000)
  assert not best.track(None, 1100, {'accuracy': 0.5})
  assert not best.track(None, 1500, {'accuracy': 0.9})  # The same eval.
  assert best.track(None, 1600, {'accuracy': 0.8})  # Patience 1: stop.
  record = json.loads((tmp_path / 'own' / 'best' / 'record.json').read_text())
  assert (record['value'], record['step'], record['evals_since']) == (
      0.9, 1500, [1600])


def test_sigterm_stops_mid_loop_and_saves(tmp_path):
  trainer = build(make_config())
  controller = controller_for(trainer, tmp_path, total_steps=10**6,
                              steps_per_loop=10**6)
  timer = threading.Timer(2.0, os.kill, args=(os.getpid(), signal.SIGTERM))
  timer.start()
  with pytest.raises(preemption.Preempted) as raised:
    controller.train()
  timer.join()
  step = raised.value.step
  assert 0 < step < 10**6
  assert saved_steps(tmp_path) == [step]
  assert int(trainer.data_position.numpy()) == step
  # The default handler is back once training stops.
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


class SigtermWhileTracing(ClassifierTrainer):
  """Sends this process SIGTERM from inside the train step's trace."""

  def compute_loss(self, batch, outputs):
    if not getattr(self, 'sent', False):
      self.sent = True
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.2)  # The handler runs here, inside the trace.
    return super().compute_loss(batch, outputs)


def test_sigterm_while_the_step_is_traced_stops_after_the_first_step(
    tmp_path):
  trainer = build(make_config(), SigtermWhileTracing)
  controller = controller_for(trainer, tmp_path, total_steps=100,
                              steps_per_loop=10)
  with pytest.raises(preemption.Preempted) as raised:
    controller.train()
  # Not a RuntimeError from the trace, and nothing of the handler traced
  # into the step: the stop request ends the first loop after one step.
  assert raised.value.step == 1
  assert saved_steps(tmp_path) == [1]
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_continuous_eval_evaluates_each_checkpoint_once(tmp_path):
  trainer = build(make_config(data='digits'))
  controller_for(trainer, tmp_path, total_steps=20, checkpoint_every=5).train()
  evaluator = build(make_config(data='digits'))
  eval_controller = controller_for(evaluator, tmp_path, total_steps=20)
  results = continuous_eval.run(
      eval_controller, eval_controller.checkpointer, timeout_secs=60,
      sleep=pytest.fail)  # Everything is there: it must never wait.
  assert [step for step, _ in results] == [5, 10, 15, 20]
  assert all(m['examples'] == 360 for _, m in results)
  lines = (tmp_path / 'eval' / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(l)['step'] for l in lines] == [5, 10, 15, 20]


def test_continuous_eval_says_which_checkpoint_was_deleted_unseen(
    tmp_path, monkeypatch, caplog):
  trainer = build(make_config(data='digits'))
  controller_for(trainer, tmp_path, total_steps=15, checkpoint_every=5).train()
  evaluator = build(make_config(data='digits'))
  eval_controller = controller_for(evaluator, tmp_path, total_steps=20)
  # ckpt-10 is still being written at the first look, and deleted (as
  # max_to_keep does) before the second; no ckpt-20 comes.
  complete = checkpointing.is_complete
  monkeypatch.setattr(checkpointing, 'is_complete',
                      lambda p: not p.endswith('ckpt-10') and complete(p))
  now = [0.0]

  def sleep(seconds):
    checkpointing.remove(str(tmp_path / 'ckpt-10'))
    now[0] += seconds
  results = continuous_eval.run(
      eval_controller, eval_controller.checkpointer, timeout_secs=5,
      poll_secs=10, clock=lambda: now[0], sleep=sleep)
  assert [step for step, _ in results] == [5, 15]
  assert (f'{tmp_path}/ckpt-10 was deleted (checkpoint.max_to_keep) before '
          'it could be evaluated; skipping it') in caplog.text


def test_continuous_eval_stops_after_timeout_without_final(tmp_path, caplog):
  trainer = build(make_config(data='digits'))
  controller_for(trainer, tmp_path, total_steps=10, checkpoint_every=5).train()
  evaluator = build(make_config(data='digits'))
  eval_controller = controller_for(evaluator, tmp_path, total_steps=100)
  now = [0.0]
  with caplog.at_level(logging.INFO, logger='absl'):
    results = continuous_eval.run(
        eval_controller, eval_controller.checkpointer, timeout_secs=30,
        poll_secs=10, clock=lambda: now[0],
        sleep=lambda s: now.__setitem__(0, now[0] + s))
  assert [step for step, _ in results] == [5, 10]
  assert now[0] > 30
  # Said at once: a watcher of a directory with no checkpoint yet is quiet
  # until the timeout otherwise.
  assert f'watching {tmp_path} for checkpoints (stopping after 30s without a ' \
      'new one, eval.timeout_secs)' in [r.getMessage() for r in caplog.records]
