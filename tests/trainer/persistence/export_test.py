"""SavedModel export: served by TensorFlow alone, equal to the Keras model."""

import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from input import digits
from models.classifier import ClassifierTrainer
from tests.trainer.trainer_test import make_config
from tests.trainer.trainer_test import strategy_for
from trainer.persistence import export
from trainer.errors import UserError

# What a serving host does with an export: TensorFlow and numpy only. Run with
# `python -I` from a scratch directory, so neither the repo nor PYTHONPATH is
# on sys.path and any dependency on distloop code would fail to load.
SERVE = '''
import importlib.util
import os
import sys

import numpy as np
import tensorflow as tf

assert importlib.util.find_spec('trainer') is None, 'distloop is importable'
features, out = np.load(sys.argv[1]), sys.argv[2]
results = {}
for export_dir in sys.argv[3:]:
  name = os.path.basename(export_dir)
  loaded = tf.saved_model.load(export_dir)
  assert type(loaded).__module__.startswith('tensorflow.'), type(loaded)
  serve = loaded.signatures['serving_default']
  _, spec = serve.structured_input_signature
  results[f'{name}/input_shape'] = [-1 if d is None else d
                                    for d in spec['input_0'].shape]
  for n in (len(features), 1, 7):
    results[f'{name}/{n}'] = serve(input_0=tf.constant(features[:n]))['outputs']
np.savez(out, **results)
'''

STRATEGIES = {
    'default': tf.distribute.get_strategy,
    'mirrored_2': lambda: strategy_for(2),
}
# Export name -> (strategy, whether export_saved_model runs in its scope).
EXPORTS = {
    'default': ('default', False),
    'mirrored_2': ('mirrored_2', False),
    'mirrored_2_in_scope': ('mirrored_2', True),
}


def trained(strategy, steps=4):
  """A digits classifier after `steps` training steps under `strategy`."""
  config = make_config(data='digits')
  tf.keras.utils.set_random_seed(config.seed)
  trainer = ClassifierTrainer(config=config, strategy=strategy)
  iterator = iter(trainer.distribute_dataset(
      'train', batch_size=trainer.global_batch_size))
  trainer.train(iterator, steps)
  return trainer


def serve_in_fresh_process(workdir, features, export_dirs):
  """Runs SERVE on `export_dirs`; returns its results {key: array}."""
  np.save(workdir / 'features.npy', features)
  (workdir / 'serve.py').write_text(SERVE)
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  result = subprocess.run(
      [sys.executable, '-I', 'serve.py', 'features.npy', 'served.npz',
       *export_dirs],
      cwd=workdir, env=env, capture_output=True, text=True, timeout=120,
      check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(workdir / 'served.npz') as served:
    return dict(served)


@pytest.fixture(scope='module')
def exports(tmp_path_factory):
  """{export name: (trainer, export dir, served results)}; see EXPORTS.

  One child process serves every export: TensorFlow's import dominates its
  cost.
  """
  root = tmp_path_factory.mktemp('exports')
  features, _ = digits.load('test')
  trainers = {name: trained(make()) for name, make in STRATEGIES.items()}
  paths = {}
  for name, (strategy, in_scope) in EXPORTS.items():
    trainer = trainers[strategy]
    with trainer.strategy.scope() if in_scope else contextlib.nullcontext():
      paths[name] = export.export_saved_model(trainer, str(root / name))
  served = serve_in_fresh_process(root, features, list(paths.values()))
  results = {}
  for name, (strategy, _) in EXPORTS.items():
    mine = {key.split('/')[1]: value for key, value in served.items()
            if key.split('/')[0] == name}
    results[name] = (trainers[strategy], paths[name], mine)
  return results


def keras_predictions(trainer, features):
  return trainer.model(features, training=False).numpy()


@pytest.mark.parametrize('name', list(EXPORTS))
def test_served_predictions_match_keras_model(exports, name):
  trainer, _, served = exports[name]
  features, _ = digits.load('test')
  assert served['360'].shape == (360, 10)
  np.testing.assert_allclose(served['360'],
                             keras_predictions(trainer, features),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', ['mirrored_2', 'mirrored_2_in_scope'])
def test_mirrored_export_is_a_single_device_model(exports, name):
  # One plain variable per MirroredVariable, placed by whoever loads it: no
  # per-replica copies, no training devices written into the graph.
  trainer, path, _ = exports[name]
  assert all(isinstance(v.value, tf.distribute.DistributedValues)
             for v in trainer.model.variables)
  saved_model = saved_model_pb2.SavedModel()
  with open(os.path.join(path, 'saved_model.pb'), 'rb') as f:
    saved_model.ParseFromString(f.read())
  variables = [node.variable
               for node in saved_model.meta_graphs[0].object_graph_def.nodes
               if node.WhichOneof('kind') == 'variable']
  assert len(variables) == len(trainer.model.variables)
  for variable in variables:
    assert not variable.device, variable
    assert not variable.experimental_distributed_variable_components


def test_signature_has_free_batch_dimension(exports):
  trainer, _, served = exports['default']
  features, _ = digits.load('test')
  assert list(served['input_shape']) == [-1, digits.NUM_FEATURES]
  for n in ('1', '7'):
    np.testing.assert_allclose(
        served[n], keras_predictions(trainer, features[:int(n)]),
        rtol=1e-5, atol=1e-6)


def loaded_predictions(path, features):
  serve = tf.saved_model.load(path).signatures['serving_default']
  return serve(input_0=tf.constant(features))['outputs'].numpy()


def test_export_twice_replaces_and_leaves_no_temporaries(tmp_path):
  features, _ = digits.load('test')
  path = str(tmp_path / 'export')
  trainer = trained(strategy_for(1))
  assert export.export_saved_model(trainer, path) == path
  (tmp_path / 'export' / 'stale.txt').write_text('from the first export')
  first = loaded_predictions(path, features)
  trainer.train(iter(trainer.distribute_dataset('train', batch_size=32)), 4)

  export.export_saved_model(trainer, path)

  assert sorted(os.listdir(tmp_path)) == ['export']
  assert not os.path.exists(os.path.join(path, 'stale.txt'))
  second = loaded_predictions(path, features)
  assert not np.allclose(first, second)
  np.testing.assert_allclose(second, keras_predictions(trainer, features),
                             rtol=1e-5, atol=1e-6)


def test_failed_export_keeps_the_previous_one(tmp_path, monkeypatch):
  features, _ = digits.load('test')
  path = str(tmp_path / 'export')
  trainer = trained(strategy_for(1))
  export.export_saved_model(trainer, path)
  before = loaded_predictions(path, features)
  save = tf.saved_model.save

  def crash_after_writing(obj, export_dir, **kwargs):
    save(obj, export_dir, **kwargs)
    os.remove(os.path.join(export_dir, 'saved_model.pb'))  # Half-written.
    raise OSError('disk full')

  monkeypatch.setattr(tf.saved_model, 'save', crash_after_writing)
  trainer.model.set_weights([w + 1 for w in trainer.model.get_weights()])
  with pytest.raises(OSError, match='disk full'):
    export.export_saved_model(trainer, path)

  assert sorted(os.listdir(tmp_path)) == ['export']
  np.testing.assert_array_equal(loaded_predictions(path, features), before)


def test_export_over_a_directory_that_is_not_a_saved_model_is_an_error(
    tmp_path):
  (tmp_path / 'notes.txt').write_text('not an export')
  with pytest.raises(UserError, match=r'exists and is not a SavedModel'):
    export.export_saved_model(trained(strategy_for(1), steps=1),
                              str(tmp_path))
  assert os.listdir(tmp_path) == ['notes.txt']


@pytest.mark.parametrize('precision', ['mixed_float16', 'mixed_bfloat16'])
def test_a_mixed_precision_model_is_served_in_float32(tmp_path, precision):
  """The model computes in 16 bits; its export serves float32, as the loss
  and metrics see the outputs (a client need not know the policy)."""
  config = make_config(data='digits')
  config.train.precision = precision
  tf.keras.utils.set_random_seed(config.seed)
  trainer = ClassifierTrainer(config=config,
                              strategy=tf.distribute.get_strategy())
  features, _ = digits.load('test')
  expected = keras_predictions(trainer, features[:7])
  assert expected.dtype != np.float32  # The model's own outputs: 16 bits.
  path = export.export_saved_model(trainer, str(tmp_path / 'export'))
  serve = tf.saved_model.load(path).signatures['serving_default']
  assert serve.structured_outputs['outputs'].dtype == tf.float32
  served = serve(input_0=tf.constant(features[:7]))['outputs'].numpy()
  assert served.dtype == np.float32
  np.testing.assert_array_equal(served, expected.astype(np.float32))


class UnnamedSpecTrainer(ClassifierTrainer):

  def serving_input_signature(self):
    return [tf.TensorSpec([None, digits.NUM_FEATURES], tf.float32)]

  def serve(self, features):
    return {'outputs': self.model(features, training=False)}


def test_an_unnamed_spec_takes_the_name_of_serves_argument(tmp_path):
  """As tf.function names it: a client calls serving_default(features=x)."""
  trainer = UnnamedSpecTrainer(config=make_config(data='digits'),
                               strategy=tf.distribute.get_strategy())
  path = export.export_saved_model(trainer, str(tmp_path / 'export'))
  serve = tf.saved_model.load(path).signatures['serving_default']
  _, spec = serve.structured_input_signature
  assert list(spec) == ['features']
  features, _ = digits.load('test')
  np.testing.assert_allclose(
      serve(features=tf.constant(features[:3]))['outputs'],
      keras_predictions(trainer, features[:3]), rtol=1e-6)


class TwoTowerTrainer(ClassifierTrainer):
  """A functional model with dict inputs (not in sorted order, one int) and
  dict or list outputs, exported by the default signature and serve."""
  outputs = 'dict'

  def build_model(self):
    user = tf.keras.Input((3,), name='user')
    item = tf.keras.Input((2,), name='item', dtype='int32')
    both = tf.keras.layers.Concatenate()(
        [user, tf.keras.ops.cast(item, 'float32')])
    score = tf.keras.layers.Dense(1, name='score')(both)
    embedding = tf.keras.layers.Dense(4, name='embedding')(user)
    outputs = ({'score': score, 'embedding': embedding}
               if self.outputs == 'dict' else [score, embedding])
    return tf.keras.Model({'user': user, 'item': item}, outputs)


class TwoTowerListTrainer(TwoTowerTrainer):
  outputs = 'list'


@pytest.mark.parametrize('trainer_class, names', [
    (TwoTowerTrainer, {'score': 'score', 'embedding': 'embedding'}),
    (TwoTowerListTrainer, {'outputs_0': 'score', 'outputs_1': 'embedding'}),
], ids=['dict_outputs', 'list_outputs'])
def test_a_dict_input_model_is_served_by_input_name(tmp_path, trainer_class,
                                                    names):
  """The signature's inputs are the dict's keys; a dict output keeps its
  keys, a list's are outputs_0, outputs_1, ... (the default serve nested
  both under 'outputs', which no SavedModel signature can hold, and passed
  the inputs to the model as a list, which a dict-input model refuses)."""
  trainer = trainer_class(config=make_config(data='digits'),
                          strategy=tf.distribute.get_strategy())
  # Positionally in model.inputs' order, by key (as they were before they
  # had names): a serve of one's own taking (item, user) keeps working.
  assert [x.name for x in trainer.serving_input_signature()] == ['item',
                                                                 'user']
  path = export.export_saved_model(trainer, str(tmp_path / 'export'))
  serve = tf.saved_model.load(path).signatures['serving_default']
  _, spec = serve.structured_input_signature
  assert {k: (v.shape.as_list(), v.dtype) for k, v in spec.items()} == {
      'user': ([None, 3], tf.float32), 'item': ([None, 2], tf.int32)}
  rng = np.random.default_rng(0)
  user = rng.normal(size=(5, 3)).astype(np.float32)
  item = rng.integers(0, 9, size=(5, 2)).astype(np.int32)
  served = serve(user=tf.constant(user), item=tf.constant(item))
  assert sorted(served) == sorted(names)
  expected = {layer: trainer.model.get_layer(layer).output
              for layer in names.values()}
  keras = tf.keras.Model(trainer.model.input, expected)(
      {'user': user, 'item': item}, training=False)
  for output, layer in names.items():
    np.testing.assert_allclose(served[output], keras[layer], rtol=1e-6)
