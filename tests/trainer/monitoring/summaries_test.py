"""Metric writers, and the scalars the Controller writes through them.

The TensorBoard writer's files are parsed back with TensorBoard's own
EventAccumulator and, record by record, with tf.compat.v1's summary_iterator
(which, unlike TensorBoard's loaders, hides nothing).
"""

import collections
import glob
import os
import time

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from models.classifier import ClassifierTrainer
from tests.trainer.trainer_test import make_config, strategy_for
from trainer.monitoring import goodput
from trainer.monitoring import summaries
from trainer.controller import Controller, ControllerOptions

TRAIN_TAGS = {
    'metrics/loss', 'metrics/accuracy', 'optimizer/learning_rate',
    'optimizer/grad_norm', 'optimizer/weight_norm', 'throughput/steps_per_sec',
    'throughput/examples_per_sec', 'throughput/input_wait_share'} | {
        f'goodput/{part}_share' for part in goodput.PARTS} | {
            'goodput/lost_steps'}


def raw_events(logdir):
  """[(tag, step, value)] of every scalar record of every file, in order."""
  found = []
  for path in summaries.event_files(str(logdir)):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        found.append((value.tag, event.step,
                      float(tf.make_ndarray(value.tensor))
                      if value.metadata.plugin_data.plugin_name == 'scalars'
                      else None))
  return found


def accumulator(logdir):
  acc = event_accumulator.EventAccumulator(
      str(logdir), size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  return acc


def scalar_series(acc, tag):
  return [(e.step, float(tf.make_ndarray(e.tensor_proto)))
          for e in acc.Tensors(tag)]


class FakeClock:
  """Advances `tick` seconds every time it is read."""

  def __init__(self, tick=0.5):
    self.now, self.tick = 0.0, tick

  def __call__(self):
    self.now += self.tick
    return self.now


# -----------------------------------------------------------------------------
# Writers.


def test_tensorboard_writer_round_trip(tmp_path):
  writer = summaries.TensorBoardWriter(str(tmp_path))
  writer.write_texts(0, {'config': '    {"a": 1}'})
  writer.write_hparams({'optimizer.learning_rate': 0.01, 'model': 'mlp',
                        'fast': True})
  writer.write_scalars(10, {'metrics/loss': 2.5, 'metrics/accuracy': 0.25})
  writer.write_scalars(20, {'metrics/loss': 1.5, 'metrics/accuracy': 0.5})
  writer.close()
  assert len(summaries.event_files(str(tmp_path))) == 1

  acc = accumulator(tmp_path)
  assert scalar_series(acc, 'metrics/loss') == [(10, 2.5), (20, 1.5)]
  assert scalar_series(acc, 'metrics/accuracy') == [(10, 0.25), (20, 0.5)]
  (text,) = acc.Tensors('config')
  assert text.step == 0
  assert tf.make_ndarray(text.tensor_proto).item() == b'    {"a": 1}'
  content = acc.SummaryMetadata(
      hparams_metadata.SESSION_START_INFO_TAG).plugin_data.content
  start_info = hparams_metadata.parse_session_start_info_plugin_data(content)
  assert start_info.hparams['optimizer.learning_rate'].number_value == 0.01
  assert start_info.hparams['model'].string_value == 'mlp'
  assert start_info.hparams['fast'].bool_value


def test_memory_writer_keeps_writes_in_order():
  writer = summaries.MemoryWriter()
  writer.write_scalars(5, {'a': 1})
  writer.write_scalars(7, {'a': 2, 'b': 3})
  writer.write_texts(0, {'config': 'x'})
  writer.write_hparams({'lr': 0.1})
  writer.flush()
  writer.close()
  assert writer.steps() == [5, 7]
  assert writer.series('a') == [(5, 1.0), (7, 2.0)]
  assert writer.series('b') == [(7, 3.0)]
  assert writer.texts == [(0, {'config': 'x'})]
  assert writer.hparams == [{'lr': 0.1}]
  assert writer.flushes == 1 and writer.closed


def test_resume_removes_orphans_and_never_writes_a_step_twice(tmp_path):
  # A run checkpointed at step 30 and died after writing steps 40 and 50.
  first = summaries.TensorBoardWriter(str(tmp_path))
  for step in (10, 20, 30, 40, 50):
    first.write_scalars(step, {'loss': float(step)})
  first.close()
  time.sleep(1.1)  # Event file names carry the time in seconds.
  resumed = summaries.TensorBoardWriter(str(tmp_path), resume_step=30)
  resumed.write_scalars(30, {'loss': -1.0})  # Already there: skipped.
  for step in (40, 50, 60):
    resumed.write_scalars(step, {'loss': step + 0.5})
  resumed.close()

  events = raw_events(tmp_path)
  assert [step for _, step, _ in events] == [10, 20, 30, 40, 50, 60]
  assert [value for _, _, value in events] == [10, 20, 30, 40.5, 50.5, 60.5]
  assert len(summaries.event_files(str(tmp_path))) == 2


def test_resume_cuts_a_damaged_tail(tmp_path):
  writer = summaries.TensorBoardWriter(str(tmp_path))
  writer.write_scalars(1, {'loss': 1.0})
  writer.close()
  (path,) = summaries.event_files(str(tmp_path))
  with open(path, 'ab') as f:
    f.write(b'\x07' * 20)  # Half a record, as a kill -9 mid-write leaves.
  summaries.TensorBoardWriter(str(tmp_path), resume_step=1).close()
  assert raw_events(tmp_path) == [('loss', 1, 1.0)]


def test_writer_without_resume_skips_steps_already_written(tmp_path):
  # An evaluator restarted on the same directory re-evaluates old checkpoints.
  for value in (1.0, 2.0):
    writer = summaries.TensorBoardWriter(str(tmp_path))
    writer.write_scalars(5, {'accuracy': value})
    writer.close()
  assert raw_events(tmp_path) == [('accuracy', 5, 1.0)]


def test_flatten_makes_hparams_values():
  flat = summaries.flatten({'seed': 0, 'train': {'steps': 3, 'lr': 0.1},
                            'model': {'sizes': (64, 64), 'act': None}})
  assert flat == {'seed': 0, 'train.steps': 3, 'train.lr': 0.1,
                  'model.sizes': '(64, 64)', 'model.act': 'None'}


# -----------------------------------------------------------------------------
# What the Controller writes.


def build(config=None, replicas=1, trainer_cls=ClassifierTrainer):
  config = config or make_config()
  tf.keras.utils.set_random_seed(config.seed)
  return trainer_cls(config=config, strategy=strategy_for(replicas))


def run_controller(trainer, *, total_steps, steps_per_loop, clock=None,
                   **options):
  options.setdefault('input_wait_every', 1)
  train_writer, eval_writer = summaries.MemoryWriter(), summaries.MemoryWriter()
  controller = Controller(
      trainer=trainer, total_steps=total_steps, steps_per_loop=steps_per_loop,
      options=ControllerOptions(**options), train_writer=train_writer,
      eval_writer=eval_writer, clock=clock or FakeClock())
  controller.train()
  return controller, train_writer, eval_writer


def test_summary_steps_need_not_divide_steps_per_loop():
  trainer = build()
  controller, train, evals = run_controller(
      trainer, total_steps=23, steps_per_loop=5, summary_every=7,
      eval_every=10)
  # Loops end on summary (7, 14, 21), eval (10, 20) and the last step.
  assert [s for s, _ in controller.history] == [5, 7, 10, 14, 19, 20, 21, 23]
  assert train.steps() == [7, 14, 21, 23]
  assert evals.steps() == [10, 20]
  # The first loop (0-5) traced, but 5-7 gives throughput at step 7.
  for step, values in train.scalars:
    assert set(values) == TRAIN_TAGS, step
  assert all(set(v) == {'metrics/loss', 'metrics/accuracy'}
             for _, v in evals.scalars)


def test_summary_values_are_interval_means():
  trainer = build()
  clock = FakeClock(tick=0.5)  # Every Trainer.train call takes 0.5 s.
  controller, train, _ = run_controller(
      trainer, total_steps=24, steps_per_loop=4, summary_every=8, clock=clock)
  loops = dict(controller.history)
  by_step = dict(train.scalars)
  assert sorted(by_step) == [8, 16, 24]
  for end in (8, 16, 24):
    parts = [loops[end - 4], loops[end]]
    examples = sum(p['examples'] for p in parts)
    for name in ('loss', 'accuracy'):
      want = sum(p[name] * p['examples'] for p in parts) / examples
      assert by_step[end][f'metrics/{name}'] == pytest.approx(want, rel=1e-6)
    want = np.mean([p['grad_norm'] for p in parts])
    assert by_step[end]['optimizer/grad_norm'] == pytest.approx(want)
  # Step 8: the loop 0-4 traced, so throughput is the loop 4-8 alone.
  assert by_step[8]['throughput/steps_per_sec'] == pytest.approx(4 / 0.5)
  assert by_step[16]['throughput/steps_per_sec'] == pytest.approx(8 / 1.0)
  assert by_step[16]['throughput/examples_per_sec'] == pytest.approx(
      8 / 1.0 * trainer.global_batch_size)
  # The input wait is over the loops' own in-graph time.
  waited = loops[12]['input_wait_secs'] + loops[16]['input_wait_secs']
  looped = loops[12]['loop_secs'] + loops[16]['loop_secs']
  assert 0 < waited < looped < 1.0
  assert by_step[16]['throughput/input_wait_share'] == pytest.approx(
      waited / looped)
  assert by_step[24]['optimizer/learning_rate'] == pytest.approx(0.1)
  weights = trainer.model.trainable_variables
  assert by_step[24]['optimizer/weight_norm'] == pytest.approx(
      np.sqrt(sum(np.sum(w.numpy() ** 2) for w in weights)), rel=1e-6)


def test_zero_summary_every_writes_no_training_scalars():
  _, train, _ = run_controller(build(), total_steps=10, steps_per_loop=5,
                               summary_every=0)
  assert not train.scalars


def test_grad_norm_is_taken_after_the_all_reduce():
  # One step from the same weights and data: a norm of one replica's
  # gradient (before the all-reduce) would differ between 1 and 2 replicas.
  config = make_config()
  initial = build(config).model.get_weights()
  norms, manual = {}, None
  for replicas in (1, 2):
    trainer = build(config, replicas)
    trainer.model.set_weights(initial)
    iterator = iter(trainer.distribute_dataset(
        'train', batch_size=trainer.global_batch_size))
    norms[replicas] = trainer.train(iterator, 1)['grad_norm']
  reference = build(config)
  reference.model.set_weights(initial)
  features, labels = next(iter(reference.distribute_dataset(
      'train', batch_size=reference.global_batch_size)))
  with tf.GradientTape() as tape:
    loss = tf.reduce_mean(reference.compute_loss(
        (features, labels), reference.model(features, training=True)))
  manual = float(tf.linalg.global_norm(
      tape.gradient(loss, reference.model.trainable_variables)))
  assert norms[1] == pytest.approx(manual, rel=1e-5)
  assert norms[2] == pytest.approx(manual, rel=1e-5)


class SlowInputTrainer(ClassifierTrainer):
  """Every training batch takes SLEEP seconds to make, with no prefetch."""

  SLEEP = 0.02

  def dataset(self, split, input_context, batch_size):
    dataset = super().dataset(split, input_context, batch_size)
    if split != 'train':
      return dataset

    def slow(features, labels):
      features = tf.py_function(
          lambda x: (time.sleep(self.SLEEP), x)[1], [features], tf.float32)
      return tf.ensure_shape(features, [batch_size, None]), labels
    return dataset.map(slow)


@pytest.mark.parametrize('replicas', [1, 2])
def test_input_wait_share_shows_a_slow_pipeline(replicas):
  waits, shares = {}, {}
  for cls in (ClassifierTrainer, SlowInputTrainer):
    trainer = build(trainer_cls=cls, replicas=replicas)
    iterator = iter(trainer.distribute_dataset(
        'train', batch_size=trainer.global_batch_size))
    trainer.train(iterator, 2, measure_input_wait=True)  # Traces.
    start = time.perf_counter()
    result = trainer.train(iterator, 10, measure_input_wait=True)
    seconds = time.perf_counter() - start
    waits[cls] = result['input_wait_secs']
    shares[cls] = waits[cls] / result['loop_secs']
    assert waits[cls] < result['loop_secs'] < seconds
  # Steps take about a millisecond here: a batch that takes 20 ms to
  # make is nearly all of the loop's time, and it is all counted as wait.
  assert waits[SlowInputTrainer] >= 9 * SlowInputTrainer.SLEEP
  assert shares[SlowInputTrainer] > 0.8
  assert waits[ClassifierTrainer] < 10 * SlowInputTrainer.SLEEP / 4


def test_input_wait_is_measured_on_one_loop_in_n():
  trainer = build()
  controller, train, _ = run_controller(
      trainer, total_steps=24, steps_per_loop=2, summary_every=4,
      input_wait_every=5)
  measured = [step for step, loop in controller.history
              if 'input_wait_secs' in loop]
  assert measured == [4, 14, 24]  # The 2nd, 7th and 12th loops.
  assert trainer.trace_counts['train_loop_timed'] == 1
  shares = {step: v.get('throughput/input_wait_share')
            for step, v in train.scalars}
  assert [s for s, share in shares.items() if share is not None] == [4, 16, 24]
  by_step = dict(controller.history)
  assert shares[16] == pytest.approx(
      by_step[14]['input_wait_secs'] / by_step[14]['loop_secs'])
  _, train, _ = run_controller(build(), total_steps=8, steps_per_loop=2,
                               summary_every=4, input_wait_every=0)
  assert all('throughput/input_wait_share' not in v for _, v in train.scalars)


def test_no_input_wait_share_when_it_cannot_be_measured():
  class Deterministic(ClassifierTrainer):
    measures_input_wait = False  # As under --deterministic.

  trainer = build(trainer_cls=Deterministic)
  iterator = iter(trainer.distribute_dataset(
      'train', batch_size=trainer.global_batch_size))
  assert 'input_wait_secs' not in trainer.train(iterator, 2,
                                                measure_input_wait=True)
  _, train, _ = run_controller(trainer, total_steps=12, steps_per_loop=4,
                               summary_every=4)
  assert all('throughput/input_wait_share' not in v for _, v in train.scalars)
  assert 'throughput/steps_per_sec' in train.scalars[-1][1]


def test_custom_step_without_apply_gradients_reports_no_grad_norm():
  class PlainStep(ClassifierTrainer):
    def train_step(self, batch):
      outputs = self.forward(batch, training=True)
      return {'loss': self.compute_loss(batch, outputs),
              **self.compute_metrics(batch, outputs)}

  _, train, _ = run_controller(build(trainer_cls=PlainStep), total_steps=10,
                               steps_per_loop=5, summary_every=5)
  assert all('optimizer/grad_norm' not in v for _, v in train.scalars)
  assert all('metrics/loss' in v for _, v in train.scalars)


def test_event_files_of_a_controller_run(tmp_path):
  trainer = build()
  train_writer = summaries.TensorBoardWriter(str(tmp_path / 'train'))
  eval_writer = summaries.TensorBoardWriter(str(tmp_path / 'eval'))
  controller = Controller(
      trainer=trainer, total_steps=20, steps_per_loop=8,
      options=ControllerOptions(summary_every=6, eval_every=10),
      train_writer=train_writer, eval_writer=eval_writer)
  controller.train()
  train_writer.close()
  eval_writer.close()
  steps = collections.defaultdict(list)
  for tag, step, _ in raw_events(tmp_path / 'train'):
    steps[tag].append(step)
  assert set(steps) == TRAIN_TAGS
  # Loops end at 6, 10 (eval), 12, 18, 20; the first one traced.
  assert steps['metrics/loss'] == [6, 12, 18, 20]
  assert steps['throughput/steps_per_sec'] == [12, 18, 20]
  assert all(steps[tag] == [6, 12, 18, 20] for tag in TRAIN_TAGS
             if not tag.startswith('throughput/'))
  assert sorted(raw_events(tmp_path / 'eval')) == sorted(
      (f'metrics/{name}', 10, controller.evals[0][1][name])
      for name in ('loss', 'accuracy'))
  assert [len(glob.glob(os.path.join(tmp_path, d, '*tfevents*')))
          for d in ('train', 'eval')] == [1, 1]
