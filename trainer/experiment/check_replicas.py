r"""Replica self-check: does your Trainer give the same weights on 1 and N replicas?

  python -m trainer.experiment.check_replicas --config=configs/digits_mlp.py:smoke \
      --num_replicas=4 --steps=20

Runs the config's Trainer for `--steps` steps on one device and, from the same
initial weights and data, on N logical CPU replicas (MirroredStrategy), then
compares every weight and the optimizer's state (Adam's moments show a
gradient scaled by N that its normalised update hides). With the same global batch the two runs see the same
examples, so a correct step gives the same weights up to float rounding; a
loss averaged per replica instead of over the global batch, gradients summed
twice or not at all, or batch statistics that depend on the replica split show
up as a mismatch. It also checks that, after training, the N copies of every
mirrored variable are identical: copies that drift apart (per-replica batch
statistics, an update applied on one replica only) mean each replica trains
a different model, and a checkpoint keeps only the first copy.

Layers that draw random numbers in training (dropout, noise, random
augmentation) draw different numbers on each replica by design
(trainer/parts/randomness.py), so 1 and N replicas cannot agree with them on.
The comparison runs them in inference mode (randomness off) and says so;
everything else about the step is compared as usual. Run it on your own
Trainer subclass before renting a pod.

Prints one line per variable that disagrees and a verdict; exits 0 when every
weight agrees within --rtol/--atol and no copies diverged, 1 when not, 2 on
a bad flag.
"""

import os
import sys

# Hide TensorFlow's C++ INFO banner lines, as main.py does.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

# pylint: disable=wrong-import-position
from absl import app
from absl import flags
import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
sys.path.insert(0, HERE)
sys.path.insert(1, os.getcwd())  # config.trainer = 'my_module:MyTrainer'

# pylint: disable=g-import-not-at-top,wrong-import-position
from trainer.experiment import cli
from trainer.experiment import config_file
from trainer import errors
from trainer import schema
from trainer.errors import UserError

DEFAULT_CONFIG = os.path.join(HERE, 'configs', 'digits_mlp.py')
config_file.use_default_config(sys.argv, DEFAULT_CONFIG)
config_file.define_config_flag(DEFAULT_CONFIG)
flags.DEFINE_integer('num_replicas', 4, 'Replicas to compare against one.')
flags.DEFINE_integer('steps', 20, 'Optimizer steps to run on each.')
flags.DEFINE_float('rtol', 1e-5, 'Relative tolerance per weight.')
flags.DEFINE_float('atol', 1e-6, 'Absolute tolerance per weight.')
FLAGS = flags.FLAGS


def run_weights(trainer, steps: int, initial_weights=None):
  """Trains `steps` steps from `initial_weights`; returns (weights, metrics)."""
  if initial_weights is not None:
    trainer.model.set_weights(initial_weights)
  dataset = trainer.distribute_dataset('train',
                                       batch_size=trainer.global_batch_size)
  metrics = trainer.train(iter(dataset), steps)
  return trainer.model.get_weights(), metrics


def compare(trainer_cls, config, *, num_replicas: int, steps: int,
            rtol: float = 1e-5, atol: float = 1e-6):
  """Trains on 1 and on `num_replicas` logical CPUs and compares weights.

  Needs at least `num_replicas` logical CPUs (strategies.configure_cpu_devices).

  Returns:
    (ok, report): ok is True when every weight agrees and no mirrored
    variable's copies differ; report lists lines of 'variable: max abs
    diff, max rel diff' for weights that do not agree, the variables whose
    copies diverged, the layers run in inference mode, and the metrics of
    both runs.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from trainer.cluster import strategies  # pylint: disable=import-outside-toplevel
  from trainer.parts import randomness  # pylint: disable=import-outside-toplevel
  from trainer.parts import replica_copies  # pylint: disable=import-outside-toplevel
  devices = [d.name for d in tf.config.list_logical_devices('CPU')]
  if len(devices) < num_replicas:
    raise UserError(f'flag --num_replicas={num_replicas} needs that many '
                    f'logical CPUs; only {len(devices)} exist')
  config = schema.resolve(config)
  tf.keras.utils.set_random_seed(config.seed)
  one = trainer_cls(config=config,
                    strategy=tf.distribute.OneDeviceStrategy(devices[0]))
  initial = one.model.get_weights()
  many = trainer_cls(
      config=config,
      strategy=strategies.mirrored_strategy(devices[:num_replicas]))
  report, ok = [], True
  random_layers = randomness.random_layers(one.model)
  with randomness.inference_mode(random_layers) as stuck_1, \
      randomness.inference_mode(randomness.random_layers(many.model)):
    weights_1, metrics_1 = run_weights(one, steps)
    weights_n, metrics_n = run_weights(many, steps, initial)
  if random_layers:
    report.append(
        f'  note: {len(random_layers)} layer(s) draw random numbers in '
        f'training ({", ".join(l.name for l in random_layers)}); compared '
        'with them in inference mode, since each replica draws its own')
  if stuck_1:
    ok = False
    report.append(f'  layer(s) {", ".join(l.name for l in stuck_1)} draw '
                  'random numbers and take no `training` argument: they '
                  'cannot be switched off, so 1 and N replicas differ by design')
  model_paths = [v.path for v in one.model.weights]
  names = list(model_paths)
  follows_noise = biases_before_norm(one.model)
  # The optimizer's state too: Adam's update barely changes when every
  # gradient is scaled alike (a loss averaged per replica on N replicas is
  # N x the right one), but its moments do not hide it.
  if len(one.optimizer.variables) != len(many.optimizer.variables):
    raise UserError(f'the optimizer has {len(one.optimizer.variables)} '
                    f'variables on 1 replica and {len(many.optimizer.variables)}'
                    f' on {num_replicas}: they cannot be compared')
  names += [f'optimizer/{v.path}' for v in one.optimizer.variables]
  weights_1 += [v.numpy() for v in one.optimizer.variables]
  weights_n += [v.numpy() for v in many.optimizer.variables]
  differ = set()  # 'weights', 'optimizer'
  for name, a, b in zip(names, weights_1, weights_n):
    if not np.allclose(a, b, rtol=rtol, atol=atol):
      abs_diff = float(np.max(np.abs(a - b)))
      rel_diff = float(np.max(np.abs(a - b) / (np.abs(a) + 1e-12)))
      line = (f'  {name}: max abs diff {abs_diff:.3g}, '
              f'max rel diff {rel_diff:.3g}')
      excuse = follows_noise.get(name) or follows_noise.get(
          slot_owner(name, model_paths))
      if excuse:
        line = f'  note: {line.strip()} ({excuse})'
      else:
        ok = False
        differ.add('optimizer' if name.startswith('optimizer/') else 'weights')
      report.append(line)
  if differ == {'optimizer'}:
    report.append('  the weights agree but the optimizer\'s state does not: '
                  'the gradients differ by a factor its update cancels '
                  '(a loss averaged over the replica\'s batch instead of the '
                  'global batch, or gradients summed twice)')
  # Named as in the weights above: the second model's layers were named
  # after the first's (batch_normalization_1, ...).
  names = {m.path: o.path for m, o in zip(many.model.variables,
                                          one.model.variables)}
  per_replica_norm = {v.path for v in replica_copies.drifting(many.model)}
  explained = set()
  for name in diverged_variables(many):
    ok = False
    shown = names.get(name, name)
    line = f'  {shown}: its {num_replicas} replica copies differ'
    layer = shown.rsplit('/', 1)[0]
    if name in per_replica_norm and layer not in explained:
      explained.add(layer)
      line += (f' (BatchNormalization {layer!r} has '
               'synchronized=False: each replica keeps the moving statistics '
               'of its own slice, and evaluations and checkpoints use the '
               'first replica\'s; synchronized=True normalises over the '
               'global batch, the same on any replica count)')
    report.append(line)
  report.append(f'  metrics on 1 replica:  {_fmt(metrics_1)}')
  report.append(f'  metrics on {num_replicas} replicas: {_fmt(metrics_n)}')
  return ok, report


def biases_before_norm(model) -> dict[str, str]:
  """{weight path: why it may differ} for the biases that feed a
  BatchNormalization directly, and that layer's moving mean.

  Batch norm subtracts the batch mean, so such a bias changes no output and
  its gradient is 0 up to rounding. Adam divides a gradient by its own
  running magnitude, which turns that rounding noise into full-size steps:
  the bias wanders differently on 1 and N replicas (and the moving mean,
  which includes it, with it) while the model computes the same function.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  found = {}
  for layer in model._flatten_layers(include_self=False):  # pylint: disable=protected-access
    bias = getattr(layer, 'bias', None)
    consumers = getattr(layer, '_outbound_nodes', ())
    activation = getattr(layer, 'activation', None)
    # Only a bias added last (no activation after it) whose one consumer is
    # a trainable batch norm over the bias's own axis.
    if (bias is None or len(consumers) != 1 or
        getattr(activation, '__name__', 'linear') != 'linear'):
      continue
    norm = getattr(consumers[0], 'operation', None)
    if not (isinstance(norm, tf.keras.layers.BatchNormalization) and
            norm.trainable and _normalises_bias_axis(layer, norm)):
      continue
    found[bias.path] = (
        f'{layer.name!r} feeds BatchNormalization {norm.name!r}, which '
        'subtracts the batch mean: this bias changes no output and its '
        'gradient is 0 up to rounding, which optimizers like Adam scale up '
        f'to full-size steps; not counted, but build {layer.name!r} with '
        'use_bias=False')
    found[norm.moving_mean.path] = (
        f'it includes the bias of {layer.name!r}, above; not counted')
  return found


def _normalises_bias_axis(layer, norm) -> bool:
  try:
    rank = len(layer.output.shape)
  except (AttributeError, ValueError):
    return False
  bias_axis = (1 if getattr(layer, 'data_format', None) == 'channels_first'
               else rank - 1)
  axes = norm.axis if isinstance(norm.axis, (list, tuple)) else [norm.axis]
  return [a % rank for a in axes] == [bias_axis]


def slot_owner(name: str, weights) -> str | None:
  """The weight (of the model's `weights` paths) an optimizer variable 'optimizer/
  OPT/FLAT_SLOT' belongs to: Keras names a slot after its weight's path
  with '/' as '_'; the longest such prefix wins (dense_bias_2 over
  dense_bias)."""
  if not name.startswith('optimizer/'):
    return None
  rest = name.split('/', 2)[-1]
  owners = [w for w in weights if rest.startswith(w.replace('/', '_') + '_')]
  return max(owners, key=len) if owners else None


def diverged_variables(trainer) -> list[str]:
  """Names of the mirrored variables (model, optimizer, step, averages,
  random-number state) whose copies on this worker's replicas differ."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  variables = [('', v) for v in trainer.model.variables]
  variables += [('optimizer/', v) for v in trainer.optimizer.variables]
  if trainer.ema:
    variables += [('', v) for v in trainer.ema.averages]
  found = []
  for prefix, variable in variables:
    value = variable if isinstance(variable, tf.Variable) else variable.value
    if getattr(value, 'synchronization', None) == (
        tf.VariableSynchronization.ON_READ):
      continue  # Per-replica by design (sums), not mirrored.
    copies = trainer.strategy.experimental_local_results(value)
    first = copies[0].numpy()
    if any(not np.array_equal(first, c.numpy()) for c in copies[1:]):
      found.append(prefix + getattr(variable, 'path', variable.name))
  return found


def _fmt(metrics):
  return ' '.join(f'{k}={v:.6g}' for k, v in sorted(metrics.items())
                  if isinstance(v, (int, float)))


def main(argv):
  del argv
  # pylint: disable=import-outside-toplevel
  import models  # noqa: F401  (registers the trainers)
  from trainer.cluster import strategies
  from trainer.experiment import registry
  try:
    strategies.configure_cpu_devices(FLAGS.num_replicas)
    config = schema.resolve(FLAGS.config)
    trainer_cls = registry.get(config.trainer)
    ok, report = compare(trainer_cls, config, num_replicas=FLAGS.num_replicas,
                         steps=FLAGS.steps, rtol=FLAGS.rtol, atol=FLAGS.atol)
  except UserError as e:
    errors.fail(str(e))
  verdict = 'PASS' if ok else 'FAIL'
  what = ('weights and optimizer state agree' if ok else
          'weights, optimizer state or copies differ')
  print(f'{verdict}: {trainer_cls.__name__} after {FLAGS.steps} steps, '
        f'1 vs {FLAGS.num_replicas} replicas ({what} within '
        f'rtol={FLAGS.rtol:g}, atol={FLAGS.atol:g})')
  print('\n'.join(report))
  sys.exit(0 if ok else 1)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
