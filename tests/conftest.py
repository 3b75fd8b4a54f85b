"""Test session set-up: 4 logical CPUs, made before TensorFlow starts.

Multi-replica tests run MirroredStrategy over the first 1, 2, 3 or 4 of them
(the way Keras' own distribute tests run without accelerators).
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

# pylint: disable=wrong-import-position
from trainer.cluster import strategies  # noqa: E402

NUM_CPU_DEVICES = 4
strategies.configure_cpu_devices(NUM_CPU_DEVICES)
