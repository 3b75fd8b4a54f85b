"""Watching a run: TensorBoard summaries, progress lines, the profiler.

  summaries   the narrow writer interface over tf.summary (and its
              in-memory double for tests)
  progress    interval means, throughput and the console's progress line
  profiling   --profile_steps: a trace window for TensorBoard's profiler
"""
