"""Distribution and the cluster: which devices and processes a run uses.

  strategies   --strategy / --tpu / TF_CONFIG -> tf.distribute.Strategy; the
               one-line errors of a cluster that does not form or loses a
               worker
  failures     a peer that did not join or died, as one line (exit 75)
  tf_config    TF_CONFIG: validation, --worker_hosts, roles
  tpu          the static-shape checks a TPU needs of an input pipeline
  asynchronous what a parameter-server run cannot keep (no TensorFlow)
  parameter_server  ParameterServerStrategy: the chief's coordinator, the
               scheduled inner loops, the worker and ps tasks' servers
  launch       `python -m trainer.cluster.launch`: N local worker processes
               (and a chief and ps tasks with --num_ps)
  service_watch  data.service: the dispatcher checked at start, watched
               while training (exit 75 when it is gone)
"""

# --strategy values (here, not in strategies.py, so that flags are checked
# before TensorFlow is imported).
STRATEGIES = ('default', 'one_device', 'mirrored', 'multi_worker_mirrored',
              'parameter_server', 'tpu')
