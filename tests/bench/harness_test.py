"""bench/harness.py: round orders, medians, spreads, ratios, tables, warm-up.

Pure Python, as the harness is: no TensorFlow, no timing-dependent asserts.
"""

import pytest

from bench import harness


def test_rotated_order_shifts_by_one_each_round():
  orders = [harness.rotated(('a', 'b', 'c'), r) for r in range(4)]
  assert orders == [['a', 'b', 'c'], ['b', 'c', 'a'], ['c', 'a', 'b'],
                    ['a', 'b', 'c']]


def test_rotated_puts_every_method_first_equally_often():
  firsts = [harness.rotated(['a', 'b', 'c', 'd'], r)[0] for r in range(8)]
  assert sorted(firsts) == ['a', 'a', 'b', 'b', 'c', 'c', 'd', 'd']


def test_rotated_with_no_methods_is_empty():
  assert harness.rotated([], 3) == []


def test_back_and_forth_reverses_every_other_round():
  orders = [harness.back_and_forth(['x', 'y', 'z'], r) for r in range(3)]
  assert orders == [['x', 'y', 'z'], ['z', 'y', 'x'], ['x', 'y', 'z']]


def test_interleaved_yields_every_method_of_every_round_in_order():
  assert list(harness.interleaved(['a', 'b'], 3)) == [
      (0, 'a'), (0, 'b'), (1, 'b'), (1, 'a'), (2, 'a'), (2, 'b')]


def test_interleaved_takes_the_order():
  schedule = harness.interleaved(['a', 'b', 'c'], 2,
                                 order=harness.back_and_forth)
  assert [name for _, name in schedule] == ['a', 'b', 'c', 'c', 'b', 'a']


def test_interleaved_with_no_rounds_yields_nothing():
  assert not list(harness.interleaved(['a', 'b'], 0))


def test_medians_per_method_odd_and_even_counts():
  assert harness.medians({'a': [3.0, 1.0, 2.0], 'b': [4.0, 1.0, 3.0, 2.0]}) == {
      'a': 2.0, 'b': 2.5}


def test_min_max():
  assert harness.min_max([0.97, 1.11, 1.02]) == (0.97, 1.11)


def test_iqr_is_the_exclusive_quartiles():
  # statistics.quantiles(n=4), 'exclusive': positions (n + 1) p = 2.25, 6.75.
  assert harness.iqr([1, 2, 3, 4, 5, 6, 7, 8]) == (2.25, 6.75)
  assert harness.iqr([5.0, 1.0, 3.0]) == (1.0, 5.0)


def test_iqr_of_one_value_is_that_value_twice():
  assert harness.iqr([0.25]) == (0.25, 0.25)


def test_format_range():
  assert harness.format_range((0.891, 0.99), '.2f') == '0.89-0.99'
  assert harness.format_range((162150.2, 184409), ',.0f') == '162,150-184,409'
  assert (harness.format_range((-0.003, 0.028), '.1%', ' .. ') ==
          '-0.3% .. 2.8%')


def test_ratio_of_medians():
  medians = {'trainer': 212220.0, 'bare': 225079.0}
  assert harness.ratio(medians, 'trainer', 'bare') == pytest.approx(0.94287,
                                                                    abs=1e-5)


def test_ratio_is_none_when_a_method_has_no_value():
  medians = {'trainer': 1.0, 'bare': 2.0}
  assert harness.ratio(medians, 'trainer', 'keras_fit') is None
  assert harness.ratio(medians, 'keras_fit', 'bare') is None


def test_paired_ratios_are_per_round():
  assert harness.paired_ratios([2.0, 3.0, 9.0], [1.0, 2.0, 3.0]) == [
      2.0, 1.5, 3.0]


def test_format_ratio():
  assert harness.format_ratio(0.94287) == '0.943'
  assert harness.format_ratio(1.05, '.2f') == '1.05'
  assert harness.format_ratio(None) == 'n/a'
  assert harness.format_ratio(None, missing='-') == '-'


def test_table_lines_align_and_rule_the_header():
  rows = [('strategy', 'trainer', 'ratio'),
          ('default', '212,220', '0.943'),
          ('mirrored', '64,288', 'n/a')]
  assert harness.table_lines(rows, (10, 9, 7)) == [
      'strategy    trainer  ratio',
      '--------------------------',
      'default     212,220  0.943',
      'mirrored     64,288    n/a',
  ]


def test_table_lines_left_aligns_the_first_left_columns():
  rows = [('a', 'b', 'c'), ('mlp', '1x1', '1')]
  assert harness.table_lines(rows, (5, 5, 3), left=2) == [
      'a    b      c', '-------------', 'mlp  1x1    1']


def test_print_table_prints_the_lines(capsys):
  harness.print_table([('x', 'y'), ('1', '2')], (3, 3))
  assert capsys.readouterr().out == 'x    y\n------\n1    2\n'


def test_calls_per_segment_fills_the_segment():
  assert harness.calls_per_segment(2.0, 0.3) == 7  # round(6.67)
  assert harness.calls_per_segment(0.5, 2.0) == 1  # at least one call


def test_calls_per_segment_in_whole_multiples():
  assert harness.calls_per_segment(2.0, 0.05, multiple=10) == 40
  assert harness.calls_per_segment(2.0, 0.3, multiple=10) == 10  # not 0
  # 2 / 0.013 = 154 calls, to the nearest multiple of 10.
  assert harness.calls_per_segment(2.0, 0.013, multiple=10) == 150


def test_calibrate_probes_with_the_given_calls():
  calls = []
  assert harness.calibrate(calls.append, 1e9, probe_calls=3) >= 1
  assert calls == [3]


def test_warm_up_keeps_order_and_reports_failures():
  warmed = []

  def prepare(name):
    warmed.append(name)
    if name == 'keras_fit':
      raise ValueError('placeholder must be fed\nstack trace ...')
    return name.upper()

  ready, failed = harness.warm_up(['trainer', 'keras_fit', 'bare'], prepare,
                                  errors=(ValueError,))
  assert warmed == ['trainer', 'keras_fit', 'bare']
  assert list(ready.items()) == [('trainer', 'TRAINER'), ('bare', 'BARE')]
  assert failed == {'keras_fit': 'ValueError: placeholder must be fed'}


def test_warm_up_lets_other_errors_through():
  def prepare(name):
    raise KeyError(name)

  with pytest.raises(KeyError):
    harness.warm_up(['trainer'], prepare, errors=(ValueError,))


def test_warm_up_uses_describe():
  def prepare(name):
    raise ValueError(name)

  _, failed = harness.warm_up(['bare'], prepare, errors=(ValueError,),
                              describe=lambda e: f'no: {e}')
  assert failed == {'bare': 'no: bare'}


def test_first_line_cuts_the_message():
  assert harness.first_line(ValueError('x' * 300 + '\nmore')) == (
      'ValueError: ' + 'x' * 200)
  assert harness.first_line(ValueError()) == 'ValueError: '


def test_timed_returns_the_result():
  result, seconds = harness.timed(sum, [1, 2, 3])
  assert result == 6
  assert seconds >= 0.0


def test_build_order_swaps_the_first_two_methods_in_the_second_process():
  names = ['a', 'b', 'c', 'd']
  orders = [harness.build_order(names, p) for p in range(4)]
  assert orders[:2] == [['a', 'b', 'c', 'd'], ['b', 'c', 'd', 'a']]
  assert orders[1].index('a') > orders[1].index('b')
  assert [order[0] for order in orders] == names


def test_pooled_concatenates_rounds_of_methods_in_every_process():
  merged = harness.pooled([{'a': [1.0, 2.0], 'b': [3.0]},
                           {'a': [4.0], 'c': [5.0]}])
  assert merged == {'a': [1.0, 2.0, 4.0]}


def test_median_paired_ratio_pairs_rounds_of_pooled_processes():
  # a/b is 1.0 in process 1 and 1.2 in process 2, which ran at half speed.
  rates = harness.pooled([{'a': [20.0] * 3, 'b': [20.0] * 3},
                          {'a': [12.0] * 3, 'b': [10.0] * 3}])
  assert harness.median_paired_ratio(rates, 'a', 'b') == pytest.approx(1.1)
  # The ratio of the pooled medians (16 / 15) mixes the two processes' speeds.
  assert harness.ratio(harness.medians(rates), 'a', 'b') == pytest.approx(
      16 / 15)
  assert harness.median_paired_ratio(rates, 'a', 'c') is None


def test_pooled_processes_keeps_losses_and_tags_failures():
  results = [
      {'rates': {'a': [1.0], 'b': [2.0]}, 'first_loss': {'a': 0.5, 'b': 0.5},
       'failed': {}},
      {'rates': {'a': [3.0]}, 'first_loss': {'a': 0.5},
       'failed': {'b': 'no placeholder'}},
  ]
  combined = harness.pooled_processes(results)
  # b failed in process 2: no pooled rounds, its process-1 rounds kept apart.
  assert combined['rates'] == {'a': [1.0, 3.0]}
  assert combined['process_rates'][0]['b'] == [2.0]
  assert combined['first_loss'] == {'a': [0.5, 0.5], 'b': [0.5]}
  assert combined['failed'] == {'b': 'no placeholder (process 2)'}
  single = harness.pooled_processes(results[1:])
  assert single['failed'] == {'b': 'no placeholder'}


def test_paired_ratios_refuses_rounds_that_do_not_pair():
  assert harness.paired_ratios([2.0, 3.0], [1.0, 3.0]) == [2.0, 1.0]
  with pytest.raises(ValueError):
    harness.paired_ratios([1.0], [1.0, 2.0])
