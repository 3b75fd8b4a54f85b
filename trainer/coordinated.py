"""The inner loop under --strategy=parameter_server, run by the chief.

With ParameterServerStrategy the variables live on the ps tasks, the steps
run on the workers and only the chief runs Python: the controller's outer
loop is the same as for any other run, and each inner loop of N steps is
handed to the workers through a `ClusterCoordinator`:

  budget := N                        a counter on a ps task
  schedule one closure per worker    each runs steps while it can claim one:
                                     claimed = (budget -= 1) >= 0
  join                               every closure done (a failed worker's
                                     closure re-run on another worker)
  read the sums, the step count      on the chief, after join

Each worker runs the Trainer's own replica step (train_step, the explicit
all-reduce over its one replica, the NaN/Inf guard, the stop request) on
batches from its own copy of the training pipeline, and applies its update
to the ps variables without waiting for the others (asynchronous training).

What is exact: `global_step` counts applied updates, each once: a step adds
1 after its update is complete, so an update is never counted without being
applied (a worker killed during a step may leave that step's update applied,
in part or whole, and not counted: asynchronous training's own loss). A
claim cannot be over-granted (a worker runs a step only if its own decrement
left the budget >= 0); a claim lost with a killed worker, or two claims
racing on the last unit, leave the loop a step or more short, and the
controller runs another loop for the rest. So a run ends at exactly
train.steps, and checkpoints land on their cadence. What is not: the order
of updates, and which batches they used (each worker reads the whole
training stream, from a starting batch of its own near the saved data
position), so a resumed or repeated run is not bitwise equal to another.
"""

import logging

import tensorflow as tf

from trainer import loops
from trainer.cluster import asynchronous
from trainer.errors import UserError
from trainer.parts import status as status_lib

# Each worker's pipeline starts at a batch of its own, drawn below this past
# the run's data position per worker, so that workers do not apply the same
# batches at the same time (two workers draw the same offset with chance
# 1/64).
MAX_START_OFFSET = 64


def check(trainer) -> None:
  """Refuses, in one line, what a parameter-server run cannot keep (the
  config keys were refused before TensorFlow by main.py already)."""
  name = type(trainer).__name__
  refused = [(f'config key {key}', fix) for key, fix in
             asynchronous.conflicts(trainer.config)]
  if any(trainer.streaming.values()):
    refused.append((f'{name}.build_streaming_metrics',
                    'streaming metrics are kept per replica, not on the ps '
                    'tasks; return them only without --strategy='
                    'parameter_server'))
  if loops.gathers_eval_outputs(trainer):
    refused.append((f'{name}.eval_outputs', 'aggregated eval metrics run '
                    'with the other strategies only; evaluate the '
                    'checkpoints with --strategy=default, or drop '
                    'eval_outputs'))
  if trainer.num_replicas != 1:
    refused.append((f'{trainer.num_replicas} replicas per worker',
                    'each worker runs one replica here (its batch is not '
                    'split over devices); give each worker one device '
                    '(e.g. CUDA_VISIBLE_DEVICES)'))
  for what, fix in refused[:1]:
    raise UserError(f'{what} is not supported with --strategy='
                    f'parameter_server: {fix}')


class _Unscheduled(logging.Filter):
  """Drops TensorFlow's warning on every strategy call on the chief outside
  `schedule` (the evaluation and the sums read there, on purpose)."""

  def filter(self, record):
    return 'without using `ClusterCoordinator.schedule`' not in (
        record.getMessage())


class Loops:
  """The chief's side of a parameter-server run, for one Trainer.

  Made in the Trainer's constructor under a ParameterServerStrategy (its
  ClusterCoordinator is made there too, one per strategy).
  """

  def __init__(self, trainer):
    check(trainer)
    logging.getLogger('tensorflow').addFilter(_Unscheduled())
    self.trainer = trainer
    strategy = trainer.strategy
    coordinator_cls = tf.distribute.experimental.coordinator.ClusterCoordinator
    self.coordinator = coordinator_cls(strategy)
    self.num_workers = len(tf.distribute.cluster_resolver.TFConfigClusterResolver(
        ).cluster_spec().as_dict()['worker'])
    with strategy.scope():
      # Not a checkpoint item: it is set at the start of every loop.
      self.budget = tf.Variable(0, dtype=tf.int64, trainable=False,
                                name='coordinated_budget')
    step_fn = loops.replica_step(trainer, trainer.train_step,
                                 trainer.train_sums, train=True)
    traces = trainer._traces  # pylint: disable=protected-access
    self._steps = traces.function(lambda it: self.steps(it, step_fn),
                                  'coordinated_steps')
    self._sums = traces.function(
        lambda: trainer.train_sums.reduce_and_reset(strategy),
        'coordinated_sums')

  def steps(self, iterator, step_fn):
    """One closure, on a worker: steps while it can claim one. Returns the
    last status (OK when the budget ran out)."""
    trainer, strategy = self.trainer, self.trainer.strategy

    def keep_going(claimed, status):
      return claimed & status_lib.continues(status)

    def body(unused_claimed, unused_status):
      claimed = self.budget.assign_sub(1) >= 0

      def step():
        status = strategy.experimental_local_results(
            strategy.run(step_fn, args=(next(iterator),)))[0]
        # Read after the update's conditional op is complete (automatic
        # control dependencies order ops on one variable as written; the
        # update writes the iteration count), so the step is counted only
        # once its update is applied.
        done = tf.identity(trainer.optimizer.iterations)
        with tf.control_dependencies([status, done]):
          trainer.data_position.assign_add(1)
          trainer.global_step.assign_add(
              tf.cast(status_lib.applied(status), tf.int64))
          # A non-finite step ends the loop on every worker: no one claims
          # a step after it (the loop is rolled back or the run ends).
          tf.cond(status == status_lib.NONFINITE,
                  lambda: self.budget.assign(0), lambda: self.budget)
        return tf.identity(status)
      status = tf.cond(claimed, step, lambda: tf.constant(status_lib.OK))
      return claimed, status

    return tf.while_loop(keep_going, body,
                         (tf.constant(True), tf.constant(status_lib.OK)))[1]

  def distribute(self, split: str, batch_size: int, service_job: str,
                 skip_batches: int = 0):
    """Training reads one copy of the pipeline per worker (built there), or
    one on the chief while validation traces (`service_job=''`);
    evaluation runs on the chief."""
    trainer = self.trainer
    if split != 'train' or not service_job:
      return trainer.dataset(split, tf.distribute.InputContext(), batch_size)
    # The workers took data_position batches between them, about an equal
    # share each: a resumed run's workers go on from there.
    skip = skip_batches // self.num_workers

    def dataset_fn():
      dataset = trainer.dataset('train', tf.distribute.InputContext(),
                                batch_size)
      # The pipeline's own shuffle is seeded by the config, the same on
      # every worker: each starts at its own point of the stream, drawn
      # with a seed from its clock.
      clock = tf.cast(tf.timestamp() * 1e6, tf.int64)
      offset = tf.random.stateless_uniform(
          [], seed=tf.stack([clock, clock // 7919]), maxval=MAX_START_OFFSET,
          dtype=tf.int64)
      return dataset.skip(skip + offset)
    return self.coordinator.create_per_worker_dataset(dataset_fn)

  def train(self, iterator, num_steps: int) -> dict:
    """Up to `num_steps` steps over the workers (loops.train's result)."""
    trainer = self.trainer
    before = int(trainer.global_step.numpy())
    self.budget.assign(num_steps)
    results = [self.coordinator.schedule(self._steps.tf_function,
                                         args=(iterator,))
               for _ in range(min(self.num_workers, num_steps))]
    self.coordinator.join()
    statuses = [int(r.fetch()) for r in results]
    # The worst: a non-finite step anywhere rolls the loop back.
    status = (status_lib.NONFINITE if status_lib.NONFINITE in statuses else
              status_lib.STOP_REQUESTED if status_lib.STOP_REQUESTED in
              statuses else status_lib.OK)
    steps = int(trainer.global_step.numpy()) - before
    sums = self._sums().numpy()
    metrics = trainer.train_sums.means(sums)
    metrics['weights'] = trainer.train_sums.weights(sums)
    norm = metrics.pop('grad_norm')
    metrics['steps'] = steps
    metrics['status'] = status
    if trainer.reports_grad_norm and steps:
      metrics['grad_norm'] = norm / steps
    return metrics

  def trace(self) -> None:
    """Traces the replica step on the chief, without running it: a user's
    method that fails to trace fails here, before anything is written."""
    trainer = self.trainer
    step_fn = loops.replica_step(trainer, trainer.train_step,
                                 trainer.train_sums, train=True)
    batch = next(iter(trainer.dataset('train', tf.distribute.InputContext(),
                                      trainer.global_batch_size)))
    tf.function(lambda b: trainer.strategy.run(step_fn, args=(b,)),
                autograph=False).get_concrete_function(batch)
