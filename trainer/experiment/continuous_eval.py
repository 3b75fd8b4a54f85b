"""--mode=continuous_eval: evaluate each new checkpoint of a training run once.

Runs beside training (another process, host or job) on the same model_dir.
"""

import time

from absl import logging

from trainer.persistence import checkpointing


def run(controller, checkpointer, *, timeout_secs: float,
        poll_secs: float = 1.0, clock=time.monotonic, sleep=time.sleep):
  """Evaluates checkpoints as they appear, oldest first, each exactly once.

  Stops when the checkpoint at controller.total_steps has been evaluated, or
  when no new checkpoint arrived for `timeout_secs`. A checkpoint that is not
  yet complete (its async write still running) is retried on the next poll;
  one deleted by max_to_keep before its turn is skipped.

  Returns:
    [(step, metrics)] for every evaluated checkpoint.
  """
  done, seen, results = set(), set(), []
  last_new = clock()
  logging.info('watching %s for checkpoints (stopping after %.0fs without a '
               'new one, eval.timeout_secs)', checkpointer.restore_directory,
               timeout_secs)
  while True:
    listed = checkpointing.checkpoint_paths(checkpointer.restore_directory)
    gone = seen - done - set(listed)
    for path in sorted(gone, key=lambda p: int(p.rsplit('-', 1)[1])):
      logging.warning('%s was deleted (checkpoint.max_to_keep) before it '
                      'could be evaluated; skipping it', path)
    seen = (seen - gone) | set(listed)  # Written again: evaluated then.
    pending = [p for p in listed if p not in done]
    for path in pending:
      if not checkpointing.is_complete(path):
        continue
      try:
        checkpointer.restore(path, model_only=True)
      except (ValueError, OSError) as e:  # Deleted or rewritten meanwhile.
        logging.warning('could not read %s (%s); skipping it', path, e)
        done.add(path)
        continue
      done.add(path)
      last_new = clock()
      results.append((controller.step, controller.evaluate()))
      if controller.step >= controller.total_steps:
        logging.info('evaluated the final checkpoint (step %d)',
                     controller.step)
        return results
    if clock() - last_new > timeout_secs:
      logging.warning('no new checkpoint in %s for %.0fs (eval.timeout_secs); '
                      'stopping', checkpointer.restore_directory, timeout_secs)
      return results
    sleep(poll_secs)
