"""A Trainer that adds what the framework does not compute for you: a
streaming metric, a metric aggregated from every prediction, a host action
and summaries of its own. Printed whole in docs/writing-a-trainer.md; a test
runs it as printed.

  python main.py --config=examples/extras_config.py

It is the shipped digits classifier (models/classifier.py) plus:
  auc, f1          Keras metric objects with state, updated in the replica
                   step and combined exactly over replicas and workers;
  median_loss      from every example's loss, gathered to the host once;
  an action        every 500 steps, a histogram of the predicted classes of
                   a fixed batch, and after each eval a line of text.
"""

import numpy as np
import tensorflow as tf

from input import digits
from models.classifier import ClassifierTrainer
from trainer.actions import Action


class ExtrasTrainer(ClassifierTrainer):
  """Digits, with AUC of 'is it an 8?', macro F1 and the median loss."""

  def build_streaming_metrics(self):  # Eagerly, under strategy.scope().
    return {'auc': tf.keras.metrics.AUC(num_thresholds=2000),
            'f1': tf.keras.metrics.F1Score(average='macro')}

  def update_streaming_metrics(self, metrics, batch, outputs):  # Replica.
    probabilities = tf.nn.softmax(outputs)
    metrics['auc'].update_state(tf.cast(batch[1] == 8, tf.float32),
                                probabilities[:, 8])
    metrics['f1'].update_state(tf.one_hot(batch[1], 10), probabilities)

  def eval_outputs(self, batch, outputs):  # Replica context: [B, ...] each.
    return {'loss': self.compute_loss(batch, outputs)}

  def aggregate(self, outputs):  # Host: every example of the split, once.
    return {'median_loss': float(np.median(outputs['loss'])),
            'eval_examples': float(len(outputs['loss']))}

  def actions(self):
    return [Action(self.predicted_classes, every_steps=500),
            Action(self.eval_note, after_eval=True)]

  def predicted_classes(self, context):  # Host, between inner loops.
    features, _ = digits.load('test')
    predicted = np.argmax(self.model(features[:256], training=False), -1)
    context.writer.write_histograms(context.step,
                                    {'predicted_class': predicted})

  def eval_note(self, context):
    context.writer.write_texts(context.step, {'note': (
        f"median loss {context.metrics['median_loss']:.4f} over "
        f"{context.metrics['eval_examples']:.0f} examples")})
