"""One experiment from the command line: flags, config, trainer, mode.

  cli             flag parsing with one-line errors
  config_file     the --config flag: a config file over the schema's defaults
  registry        config.trainer -> a Trainer subclass (name or import path)
  run             the experiment main.py runs: strategy, trainer, controller
  ending          how main.py's process exits (with the other workers)
  validation      a Trainer's mistakes found before model_dir is written
  kept_state      ... among them, state it keeps that no checkpoint saves
  continuous_eval --mode=continuous_eval: evaluate checkpoints as they come
  check_replicas  `python -m trainer.experiment.check_replicas`: 1 vs N
                  replicas on your own Trainer

Nothing here is imported by the training loop; the dependencies point from
here down to it.
"""
