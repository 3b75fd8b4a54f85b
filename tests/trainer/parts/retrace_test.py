"""Counted tf.functions: traces counted, a late retrace logged by name."""

import logging as std_logging

import tensorflow as tf

from tests.trainer.trainer_test import make_config, train
from trainer.parts import retrace


def test_the_part_alone_counts_traces_and_warns_after_warm_up(caplog):
  counter = retrace.TraceCounter('Owner')
  square = counter.function(lambda x: x * x, 'square')
  square(tf.constant(2))
  square(tf.constant(3))  # Same signature: no retrace.
  assert counter.counts['square'] == 1 and 'retraced' not in caplog.text
  with caplog.at_level(std_logging.WARNING):
    square(tf.constant(2.0))  # A float: a second trace, after warm-up.
  assert counter.counts['square'] == 2 and counter.total() == 2
  assert "Owner: tf.function 'square' retraced (trace #2)" in caplog.text


def test_no_retrace_after_warmup(caplog):
  config = make_config('adam')
  trainer, _ = train(config, 2, loops=(8, 8, 3, 5))
  trainer.evaluate('test')
  trainer.evaluate('test')
  assert dict(trainer.trace_counts) == {'train_loop': 1, 'eval_loop': 1}
  assert 'retraced' not in caplog.text


def test_retrace_after_warmup_is_logged(caplog):
  trainer, _ = train(make_config(), 1, loops=(2,))
  iterator = iter(trainer.distribute_dataset('train', batch_size=32))
  with caplog.at_level(std_logging.WARNING):
    trainer._train_loop(iterator, tf.constant(2, tf.int64))  # pylint: disable=protected-access
  assert trainer.trace_counts['train_loop'] == 2
  assert "'train_loop' retraced" in caplog.text


