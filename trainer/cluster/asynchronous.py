"""What asynchronous (parameter-server) training cannot keep, checked
without TensorFlow: by main.py on every task before anything starts, and
by the Trainer (trainer/coordinated.py) for direct callers of run()."""

from trainer import schema


def conflicts(config) -> list[tuple[str, str]]:
  """(key=value, why and the fix) for each config key a parameter-server
  run cannot keep: its workers apply their updates asynchronously."""
  c = schema.resolve(config)
  found = [
      (c.train.ema_decay, f'train.ema_decay={c.train.ema_decay:g}',
       'the average would be updated by every worker at once; set '
       'train.ema_decay=0'),
      (c.train.precision == 'mixed_float16',
       f'train.precision={c.train.precision!r}',
       'the dynamic loss scale is a per-step decision of one synchronous '
       "step; use 'float32' (or 'mixed_bfloat16', which needs no loss scale)"),
      (c.train.grad_accum_steps > 1,
       f'train.grad_accum_steps={c.train.grad_accum_steps}',
       'each worker applies its own updates; raise the batch size instead'),
      (c.data.service, f'data.service={c.data.service!r}',
       "each worker reads its own pipeline; set data.service=''"),
      (c.train.variable_shard_bytes and c.optimizer.name == 'lamb',
       f"optimizer.name='lamb' with train.variable_shard_bytes="
       f'{c.train.variable_shard_bytes}',
       "LAMB's trust ratio is a norm per variable, and would be taken per "
       'piece; use adam, adamw or sgd, or set train.variable_shard_bytes=0'),
  ]
  return [(key, fix) for bad, key, fix in found if bad]
