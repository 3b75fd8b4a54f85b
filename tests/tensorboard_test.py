"""Monitoring end to end: main.py's event files, profile and progress lines,
read back from disk and through a real TensorBoard server on 127.0.0.1.

One main.py run (module fixture) is shared by most tests: 40 smoke steps in
train_and_eval with summary.every_steps=15 (which does not divide
steps_per_loop=10) and --profile_steps=12,14.
"""

import collections
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
import tensorflow as tf
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from configs import digits_mlp
from tests import runner
from trainer.experiment import config_file
from trainer.experiment import run as experiment
from trainer.cluster import launch
from trainer.monitoring import goodput
from trainer.monitoring import summaries

SMOKE = '--config=configs/digits_mlp.py:smoke'
RUN_FLAGS = (SMOKE, '--mode=train_and_eval', '--config.train.steps=40',
             '--config.summary.every_steps=15', '--config.eval.every_steps=20',
             '--profile_steps=12,14', '--config.summary.input_wait_every_loops=1',
             '--config.summary.histograms_every_steps=20')
TRAIN_TAGS = {
    'metrics/loss', 'metrics/accuracy', 'optimizer/learning_rate',
    'optimizer/grad_norm', 'optimizer/weight_norm', 'throughput/steps_per_sec',
    'throughput/examples_per_sec', 'throughput/input_wait_share'} | {
        f'goodput/{part}_share' for part in goodput.PARTS} | {
            'goodput/lost_steps'}
EVAL_TAGS = {'metrics/loss', 'metrics/accuracy'}
PROGRESS = re.compile(r'\] (step (\d+)/40: .*)$', re.M)


@pytest.fixture(name='run', scope='module')
def fixture_run(tmp_path_factory):
  """(model_dir, CompletedProcess) of the shared run; logdir is its parent.

  A twin run with the same flags (hence the same hparams) is made beside it,
  at the same time: the HParams dashboard must show them as two sessions.
  """
  logdir = tmp_path_factory.mktemp('logs')
  twin = runner.start_main(*RUN_FLAGS, f'--model_dir={logdir / "twin"}')
  model_dir = logdir / 'run'
  result = runner.run_main(*RUN_FLAGS, f'--model_dir={model_dir}')
  assert result.returncode == 0, result.stderr[-3000:]
  _, stderr = twin.communicate(timeout=300)
  assert twin.returncode == 0, stderr[-3000:]
  # Runs whose actions write a text sample (the LM) and eval images.
  for name, path, mode in (
      ('lm', 'lm_transformer.py', 'train_and_eval'),  # Evals at 3 and 6.
      ('images', 'cifar_resnet20.py', 'train')):      # One, at step 4.
    config = config_file.load_config(os.path.join(runner.REPO, 'configs',
                                                  f'{path}:smoke'))
    experiment.run(config, model_dir=str(logdir / name),
                   strategy_name='default', mode=mode)
  return model_dir, result


def events(logdir):
  """[Event] with a summary, from every event file directly in logdir."""
  found = []
  for path in summaries.event_files(str(logdir)):
    for record in tf.data.TFRecordDataset(path):
      event = event_pb2.Event.FromString(record.numpy())
      if event.summary.value:
        found.append(event)
  return found


def scalars(logdir) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} in file order, every record (nothing merged)."""
  series = collections.defaultdict(list)
  for event in events(logdir):
    for value in event.summary.value:
      if value.metadata.plugin_data.plugin_name == 'scalars':
        series[value.tag].append(
            (event.step, float(tf.make_ndarray(value.tensor))))
  return dict(series)


def test_one_event_file_per_directory(run):
  model_dir, _ = run
  found = sorted(os.path.relpath(os.path.dirname(p), model_dir) for p in
                 glob.glob(f'{model_dir}/**/*tfevents*', recursive=True))
  assert found == ['.', 'eval', 'train']


def test_train_scalars_every_15_steps_and_at_the_end(run):
  model_dir, result = run
  train = scalars(model_dir / 'train')
  assert set(train) == TRAIN_TAGS
  for tag, points in train.items():
    assert [step for step, _ in points] == [15, 30, 40], tag
  # The logged interval 30-40 is one inner loop: its progress line shows
  # the same loss.
  line = dict((int(s), l) for l, s in PROGRESS.findall(result.stderr))[40]
  assert f'loss={train["metrics/loss"][-1][1]:.4g} ' in line
  assert train['optimizer/learning_rate'][-1][1] == pytest.approx(1e-3)
  for step, share in train['throughput/input_wait_share']:
    assert 0 <= share <= 1, step
  for (_, steps), (_, examples) in zip(train['throughput/steps_per_sec'],
                                       train['throughput/examples_per_sec']):
    assert examples == pytest.approx(steps * 64, rel=1e-6)


def test_goodput_so_far_in_train_and_the_final_account_in_the_run(run):
  model_dir, result = run
  train = scalars(model_dir / 'train')
  final = scalars(model_dir)
  # The top-level run holds the final account once, at the last step: the
  # one goodput.json and the last log line give.
  assert {tag for tag in final if tag.startswith('goodput/')} == {
      tag for tag in TRAIN_TAGS if tag.startswith('goodput/')}
  totals = json.loads((model_dir / 'goodput.json').read_text())
  for part, share in totals['shares'].items():
    assert final[f'goodput/{part}_share'] == [(40, pytest.approx(share))]
  assert final['goodput/lost_steps'] == [(40, 0.0)]
  # The share of productive steps grows as training goes on.
  shares = [share for _, share in train['goodput/productive_share']]
  assert 0 <= shares[0] < shares[-1] < 1
  (line,) = [l for l in result.stderr.splitlines() if '] goodput: ' in l]
  assert f'goodput: {totals["shares"]["productive"]:.1%} productive' in line


def test_eval_scalars_match_the_eval_records(run):
  model_dir, result = run
  evals = scalars(model_dir / 'eval')
  assert set(evals) == EVAL_TAGS
  records = [json.loads(l) for l in
             (model_dir / 'eval' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records] == [20, 40]
  for name in ('loss', 'accuracy'):
    assert evals[f'metrics/{name}'] == [
        (r['step'], pytest.approx(r[name], rel=1e-6)) for r in records]
  final = runner.final_eval(result.stdout)
  assert evals['metrics/accuracy'][-1][1] == pytest.approx(
      final['accuracy'], abs=1e-4)


def test_config_text_at_step_0_and_hparams(run):
  model_dir, _ = run
  # Then the final goodput account (test_goodput_so_far_...).
  (text, start, *_) = events(model_dir)
  assert text.step == 0 and text.summary.value[0].tag == 'config'
  markdown = tf.make_ndarray(text.summary.value[0].tensor).item().decode()
  assert json.loads(markdown) == json.loads(
      (model_dir / 'config.json').read_text())
  (value,) = start.summary.value
  assert value.tag == hparams_metadata.SESSION_START_INFO_TAG
  info = hparams_metadata.parse_session_start_info_plugin_data(
      value.metadata.plugin_data.content)
  assert info.hparams['train.steps'].number_value == 40
  assert info.hparams['summary.every_steps'].number_value == 15
  assert info.hparams['model.hidden_sizes'].string_value == '(64, 64)'
  assert info.hparams['run.strategy'].string_value == 'default'
  assert info.hparams['run.num_replicas'].number_value == 1
  assert info.group_name == 'run'  # Its own session group: the run's name.


def test_profile_trace_marks_each_profiled_step(run):
  model_dir, result = run
  (path,) = glob.glob(f'{model_dir}/train/plugins/profile/*/*.xplane.pb')
  assert os.path.getsize(path) > 0
  with open(path, 'rb') as f:
    space = xplane_pb2.XSpace.FromString(f.read())
  steps = []
  for plane in space.planes:
    names = {k: v.name for k, v in plane.event_metadata.items()}
    stat_names = {k: v.name for k, v in plane.stat_metadata.items()}
    for line in plane.lines:
      for event in line.events:
        if names[event.metadata_id] == 'train':
          stats = {stat_names[s.metadata_id]: s.int64_value or s.uint64_value
                   for s in event.stats}
          assert stats['_r'] == 1
          steps.append(stats['step_num'])
  assert sorted(steps) == [12, 13, 14]
  # One-step inner loops inside the window only.
  logged = [int(s) for _, s in PROGRESS.findall(result.stderr)]
  assert logged == [10, 11, 12, 13, 14, 15, 20, 30, 40]


def test_progress_lines(run):
  _, result = run
  lines = dict((int(s), l) for l, s in PROGRESS.findall(result.stderr))
  # The first loop traced: no throughput, but its in-graph input wait.
  assert re.fullmatch(r'step 10/40: loss=[\d.]+ accuracy=[\d.]+ '
                      r'input_wait=\d+%', lines[10])
  assert re.fullmatch(r'step 30/40: loss=[\d.]+ accuracy=[\d.]+ '
                      r'examples/sec=[\d,]+ input_wait=\d+% ETA \d:\d\d:\d\d',
                      lines[30])
  assert lines[40].endswith(' done')
  assert re.search(r'\] eval test at step 20: accuracy=[\d.]+ examples=360 '
                   r'loss=[\d.]+$', result.stderr, re.M)


def test_resume_writes_no_step_twice(run, tmp_path):
  # The first run checkpointed at 20, 30 and 40; pretend it died after
  # writing its summaries of steps 30 and 40 but before saving ckpt-30.
  model_dir = tmp_path / 'run'
  shutil.copytree(run[0], model_dir)
  for path in glob.glob(f'{model_dir}/ckpt-[34]0.*'):
    os.remove(path)
  time.sleep(1.1)  # Event file names carry the time in seconds.
  config = digits_mlp.get_config('smoke')
  config.train.steps = 40
  config.summary.every_steps = 15
  config.eval.every_steps = 20
  metrics = experiment.run(config, model_dir=str(model_dir),
                           strategy_name='default', mode='train_and_eval')
  for directory in ('', 'train', 'eval'):
    assert len(summaries.event_files(str(model_dir / directory))) == 2
    seen = collections.defaultdict(list)
    for event in events(model_dir / directory):
      for value in event.summary.value:
        seen[value.tag].append(event.step)
    for tag, steps in seen.items():
      assert steps == sorted(set(steps)), (directory, tag, steps)
  train = scalars(model_dir / 'train')
  assert [s for s, _ in train['metrics/loss']] == [15, 30, 40]
  evals = scalars(model_dir / 'eval')
  assert evals['metrics/accuracy'] == [
      (20, scalars(run[0] / 'eval')['metrics/accuracy'][0][1]),
      (40, pytest.approx(metrics['accuracy'], abs=1e-6))]
  # The resumed process wrote the config again at the step it started from.
  assert [e.step for e in events(model_dir)
          if e.summary.value[0].tag == 'config'] == [0, 20]


def test_continuous_evaluator_writes_its_own_directory(run, tmp_path):
  model_dir = tmp_path / 'run'
  shutil.copytree(run[0], model_dir)
  before = {d: summaries.event_files(str(model_dir / d))
            for d in ('', 'train', 'eval')}
  config = digits_mlp.get_config('smoke')
  config.train.steps = 40
  experiment.run(config, model_dir=str(model_dir), strategy_name='default',
                 mode='continuous_eval')
  evals = scalars(model_dir / 'continuous_eval')
  assert [s for s, _ in evals['metrics/accuracy']] == [20, 30, 40]
  assert evals['metrics/accuracy'][-1] == scalars(
      model_dir / 'eval')['metrics/accuracy'][-1]
  assert before == {d: summaries.event_files(str(model_dir / d))
                    for d in ('', 'train', 'eval')}


def test_bad_profile_steps_is_one_line_error(tmp_path):
  # Other bad values: tests/trainer/monitoring/progress_test.py.
  value = '9,3'
  model_dir = tmp_path / 'run'
  result = runner.run_main(SMOKE, f'--profile_steps={value}',
                           f'--model_dir={model_dir}')
  assert result.returncode == 2
  (error,) = runner.error_lines(result.stderr)
  assert error == (f"error: flag --profile_steps='{value}' must be START,END "
                   'with 1 <= START <= END (the first and last step to '
                   'trace, e.g. --profile_steps=10,15)')
  assert 'Traceback' not in result.stderr
  assert not model_dir.exists()


def test_only_the_chief_writes_summaries(tmp_path):
  model_dir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, '-m', 'trainer.cluster.launch', '--num_workers=2', '--',
       SMOKE, '--strategy=multi_worker_mirrored', f'--model_dir={model_dir}'],
      cwd=runner.REPO, capture_output=True, text=True, timeout=300,
      check=False, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
  assert result.returncode == 0, result.stderr[-3000:]
  files = glob.glob(f'{model_dir}/**/*tfevents*', recursive=True)
  assert sorted(os.path.relpath(os.path.dirname(p), model_dir)
                for p in files) == ['.', 'eval', 'train']
  # Event file names end in .<pid>.<n>.v2: all three from one process.
  assert len({os.path.basename(p).split('.')[-3] for p in files}) == 1
  assert '[worker 1] ' in ''.join(
      l for l in result.stderr.splitlines()
      if 'this worker writes no TensorBoard summaries' in l)
  assert not [l for l in result.stderr.splitlines()
              if l.startswith('[worker 0] ') and 'writes no TensorBoard' in l]
  assert [s for s, _ in scalars(model_dir / 'train')['metrics/loss']] == [
      10, 20]


# -----------------------------------------------------------------------------
# A real TensorBoard server.


def http_json(url, body=None, timeout=10):
  data = None if body is None else json.dumps(body).encode()
  request = urllib.request.Request(
      url, data=data, headers={'Content-Type': 'application/json'})
  with urllib.request.urlopen(request, timeout=timeout) as response:
    return json.loads(response.read())


@pytest.fixture(name='tensorboard')
def fixture_tensorboard(run):
  """http://127.0.0.1:PORT of `tensorboard --logdir <parent of the run>`."""
  logdir = run[0].parent
  port = launch.free_ports(1)[0]
  process = subprocess.Popen(
      [sys.executable, '-m', 'tensorboard.main', f'--logdir={logdir}',
       '--host=127.0.0.1', f'--port={port}', '--reload_interval=1'],
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  url = f'http://127.0.0.1:{port}'
  try:
    deadline = time.monotonic() + 90
    while True:
      assert process.poll() is None, process.stderr.read()[-3000:]
      try:
        tags = http_json(f'{url}/data/plugin/scalars/tags', timeout=2)
        if {'run/train', 'run/eval', 'twin/eval'} <= set(tags):
          break
      except OSError:
        pass
      assert time.monotonic() < deadline, 'TensorBoard did not serve the run'
      time.sleep(0.25)
    yield url
  finally:
    process.terminate()
    try:
      process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()


def test_tensorboard_serves_what_the_run_logged(run, tensorboard):
  model_dir, result = run
  tags = http_json(f'{tensorboard}/data/plugin/scalars/tags')
  assert set(tags['run/train']) == TRAIN_TAGS
  assert set(tags['run/eval']) == EVAL_TAGS
  for run_name, directory in (('run/train', 'train'), ('run/eval', 'eval')):
    on_disk = scalars(model_dir / directory)
    for tag in tags[run_name]:
      served = http_json(f'{tensorboard}/data/plugin/scalars/scalars?' +
                         urllib.parse.urlencode({'run': run_name, 'tag': tag}))
      # [wall_time, step, value]; float32 values come back exactly.
      assert [(step, value) for _, step, value in served] == on_disk[tag], tag

  text = http_json(f'{tensorboard}/data/plugin/text/text?run=run&tag=config')
  assert [t['step'] for t in text] == [0]

  # The HParams dashboard: one session, its config, and the final eval.
  experiment_info = http_json(f'{tensorboard}/data/plugin/hparams/experiment',
                              {'experimentName': ''})
  names = {h['name'] for h in experiment_info['hparamInfos']}
  assert {'train.steps', 'optimizer.learning_rate', 'model.hidden_sizes'} <= names
  metric_names = {(m['name']['group'], m['name']['tag'])
                  for m in experiment_info['metricInfos']}
  assert {('eval', 'metrics/accuracy'), ('eval', 'metrics/loss')} <= metric_names
  groups = http_json(
      f'{tensorboard}/data/plugin/hparams/session_groups',
      {'experimentName': '', 'startIndex': 0, 'sliceSize': 10,
       'allowedStatuses': ['STATUS_UNKNOWN', 'STATUS_SUCCESS',
                           'STATUS_FAILURE', 'STATUS_RUNNING'],
       'colParams': [{'metric': {'group': 'eval', 'tag': 'metrics/accuracy'}},
                     {'hparam': 'train.steps'}]})
  # Equal hparams, two runs: two groups, never one averaged group.
  by_name = {g['name']: g for g in groups['sessionGroups']}
  assert sorted(by_name) == ['images', 'lm', 'run', 'twin']
  group = by_name['run']
  assert group['hparams']['train.steps'] == 40
  assert by_name['twin']['hparams'] == group['hparams']
  (metric,) = [m for m in group['metricValues']
               if m['name'] == {'group': 'eval', 'tag': 'metrics/accuracy'}]
  final = runner.final_eval(result.stdout)
  assert metric['trainingStep'] == 40
  assert metric['value'] == pytest.approx(final['accuracy'], abs=1e-4)


def test_tensorboard_serves_images_texts_and_histograms(run, tensorboard):
  """What actions write (trainer/actions.py): weight histograms every 20
  steps (summary.histograms_every_steps), the LM's text sample and the
  image classifier's eval images after each eval."""
  histograms = http_json(f'{tensorboard}/data/plugin/histograms/tags')
  kernel = 'weights/mlp/dense_0/kernel'
  assert kernel in histograms['run/train']
  served = http_json(f'{tensorboard}/data/plugin/histograms/histograms?' +
                     urllib.parse.urlencode({'run': 'run/train',
                                             'tag': kernel}))
  assert [step for _, step, _ in served] == [20, 40]
  images = http_json(f'{tensorboard}/data/plugin/images/tags')
  examples = images['images/eval']['eval/examples']
  assert examples['samples'] == 8 and 'predicted' in examples['description']
  served = http_json(f'{tensorboard}/data/plugin/images/images?' +
                     urllib.parse.urlencode({'run': 'images/eval',
                                             'tag': 'eval/examples',
                                             'sample': 0}))
  assert [image['step'] for image in served] == [4]
  texts = http_json(f'{tensorboard}/data/plugin/text/text?' +
                    urllib.parse.urlencode({'run': 'lm/eval',
                                            'tag': 'sample'}))
  assert [t['step'] for t in texts] == [3, 6] and texts[-1]['text']
