"""How long the inner loop waited for each batch, measured in the graph."""

import contextlib

import tensorflow as tf


def timed_next(iterator):
  """(next batch, seconds spent getting it), inside the traced inner loop.

  How the input wait is measured, honestly: a (host CPU) timestamp right
  before the iterator's GetNext ops start, and, for each device's part of
  the batch, one once all its tensors exist. That part of the batch then
  goes on through identities that depend on its timestamp, so the replica's
  compute starts only after it: otherwise the timestamp op could queue
  behind the step's own ops and count compute as waiting (that read ~50 %
  on the default run instead of the true ~18 %). Iterations of the inner
  loop run one after another (each waits for the previous step, optimizer
  update included, through the loop variables and the function's automatic
  control dependencies), so the wait is time in which that replica's step
  could not run: blocked on an empty prefetch buffer, plus the fixed cost of
  handing over a batch that was ready. Returned: the mean over devices
  (replicas of this worker), float64. On TPU these are the host's waits for
  its input pipeline, not infeed time on the device.
  """
  start = tf.timestamp()
  with tf.control_dependencies([start]):
    batch = next(iterator)
  flat = tf.nest.flatten(batch, expand_composites=True)
  by_device = {}
  for i, tensor in enumerate(flat):
    by_device.setdefault(tensor.device, []).append(i)
  waits = []
  for device, indices in by_device.items():
    # On the replica's device when it is a CPU (tf.timestamp has no GPU or
    # TPU kernel): a control edge across devices costs a send/receive pair.
    cpu = tf.DeviceSpec.from_string(device).device_type == 'CPU'
    with (tf.device(device) if cpu else contextlib.nullcontext()), \
         tf.control_dependencies([flat[i] for i in indices]):
      got = tf.timestamp()
    waits.append(got - start)
    with tf.control_dependencies([got]):
      for i in indices:
        with tf.device(flat[i].device):
          flat[i] = tf.identity(flat[i])
  batch = tf.nest.pack_sequence_as(batch, flat, expand_composites=True)
  return batch, waits[0] if len(waits) == 1 else tf.add_n(waits) / len(waits)


def measurable() -> bool:
  """False under op determinism (--deterministic), which refuses
  tf.timestamp: then nothing is timed."""
  # TF 2.21 has no public getter (tf.config.experimental only enables it).
  from tensorflow.python.framework import config  # pylint: disable=g-direct-tensorflow-import,import-outside-toplevel
  return not config.is_op_determinism_enabled()
