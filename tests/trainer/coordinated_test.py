"""What the parameter-server inner loop refuses, one line each (the loop
itself runs with real processes in tests/parameter_server_test.py)."""

import pytest

from trainer import coordinated
from trainer import schema
from trainer.errors import UserError


def _default(self, batch, outputs):
  del self, batch, outputs


_default.is_default = True


class Plain:
  """The attributes coordinated.check reads of a Trainer."""
  eval_outputs = _default

  def __init__(self, streaming=False, num_replicas=1, **train):
    self.config = schema.resolve({
        'trainer': 'classifier',
        'train': {'steps': 10, 'global_batch_size': 8, **train}})
    self.streaming = {'train': {'auc': object()} if streaming else {},
                      'eval': {}}
    self.num_replicas = num_replicas


class Gathering(Plain):
  def eval_outputs(self, batch, outputs):
    return {}


@pytest.mark.parametrize('trainer, message', [
    (Plain(ema_decay=0.9), 'config key train.ema_decay=0.9 is not supported '
     'with --strategy=parameter_server: the average would be updated by '
     'every worker at once; set train.ema_decay=0'),
    (Plain(precision='mixed_float16'), "config key train.precision="
     "'mixed_float16' is not supported"),
    (Plain(streaming=True), 'Plain.build_streaming_metrics is not supported'),
    (Gathering(), 'Gathering.eval_outputs is not supported with --strategy='
     'parameter_server: aggregated eval metrics run with the other '
     'strategies only; evaluate the checkpoints with --strategy=default, or '
     'drop eval_outputs'),
    (Plain(num_replicas=2), '2 replicas per worker is not supported with '
     '--strategy=parameter_server: each worker runs one replica here'),
], ids=['ema', 'mixed_float16', 'streaming', 'eval_outputs', 'replicas'])
def test_what_the_asynchronous_loop_cannot_keep_is_one_line(trainer, message):
  with pytest.raises(UserError) as e:
    coordinated.check(trainer)
  assert str(e.value).startswith(message)
  assert '\n' not in str(e.value)


def test_a_plain_trainer_passes():
  coordinated.check(Plain())
