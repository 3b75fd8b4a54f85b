"""Model builders and the Trainer subclasses that use them.

Importing this package registers every trainer (trainer/experiment/registry.py).
"""

from models import classifier  # noqa: F401  (registers 'classifier')
from models import image_classifier  # noqa: F401  (registers 'image_classifier')
from models import lm  # noqa: F401  (registers 'lm')
