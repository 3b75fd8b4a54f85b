"""Checkpoints in model_dir: the model under the key `model`, optimizer, step."""

import tensorflow as tf


def checkpoint_manager(trainer, model_dir: str, *, max_to_keep: int = 3):
  """Returns a CheckpointManager over model_dir for the trainer's state."""
  checkpoint = tf.train.Checkpoint(model=trainer.model,
                                   optimizer=trainer.optimizer,
                                   step=trainer.global_step)
  return tf.train.CheckpointManager(checkpoint, model_dir,
                                    max_to_keep=max_to_keep,
                                    step_counter=trainer.global_step)
