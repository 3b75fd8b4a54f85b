"""distloop: a distribution-correct custom training loop for TensorFlow 2.

The layout, by concern (docs/architecture.md draws how a run flows through
it):

  trainer.py, step.py, loops.py   the Trainer: its subclass contract, the
                                  replica step, the inner loops
  wiring.py                       what the Trainer's constructor builds
  parts/                          the step's features, one module each
  optimization.py                 optimizers and learning-rate schedules
  controller.py                   the outer loop: host work between loops
  cluster/                        strategies, TF_CONFIG, TPU, local launcher
  persistence/                    checkpoints, preemption, export
  monitoring/                     TensorBoard summaries, progress, profiling
  experiment/                     command line, config, trainer lookup, modes
"""
