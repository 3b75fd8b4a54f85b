"""Never losing a run: checkpoints, preemption, export.

  checkpointing  checkpoints with the data position, verified restore
  checkpoint_writer  how a checkpoint is written (one traced SaveV2, async)
  run_record     run.json: what a resume must not change
  preemption     SIGTERM -> a checkpoint and a retryable exit status
  export         the SavedModel for serving
"""
