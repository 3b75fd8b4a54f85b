"""distloop: a distribution-correct custom training loop for TensorFlow 2."""
