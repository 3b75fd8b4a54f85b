"""A multi-layer perceptron: Dense(relu) x len(hidden) then Dense(num_classes)."""

import tensorflow as tf


def build_mlp(*, input_dim: int, hidden_sizes, num_classes: int,
              dropout: float = 0.0, name: str = 'mlp') -> tf.keras.Model:
  """A Keras model mapping float [B, input_dim] to logits [B, classes].

  With `dropout` > 0, a Dropout layer of that rate follows each hidden layer
  (each replica draws its own masks: trainer/parts/randomness.py).
  """
  layers = [tf.keras.Input(shape=(input_dim,))]
  for i, width in enumerate(hidden_sizes):
    layers.append(tf.keras.layers.Dense(width, activation='relu',
                                        name=f'dense_{i}'))
    if dropout:
      layers.append(tf.keras.layers.Dropout(dropout, name=f'dropout_{i}'))
  layers.append(tf.keras.layers.Dense(num_classes, name='logits'))
  return tf.keras.Sequential(layers, name=name)
