"""The parts of the training step, one concern each.

Each module here is usable and testable on its own (tests/trainer/parts/):

  accumulation   gradients of k micro-batches summed into one step's
  autograph      AutoGraph converts the Trainer's methods, not the framework
  contracts      the shapes compute_loss / compute_metrics must return
  distributed_input  a Trainer's dataset over the strategy's replicas
  ema            exponential moving average of the weights
  input_wait     how long the loop waited for its next batch
  loss_scale     dynamic loss scaling for mixed_float16
  metric_sums    per-example values summed across replicas and workers
  precision      Keras dtype policies
  randomness     per-replica random numbers, and their checkpointed state
  retrace        tf.functions that count their traces
  sharding       Keras weights in pieces over ps tasks, trained and saved
  status         what every replica agrees a step did (OK, stop, NaN...)
  streaming      Keras metric objects (AUC, F1...) combined across replicas

None of them imports the Trainer, the step or the loops: the dependencies
point from the Trainer down to them.
"""
