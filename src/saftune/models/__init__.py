"""Models: every family is a `Classifier` (collate, features, forward, set_classes), built by name."""

from saftune.models.base import Classifier, classification_loss
from saftune.models.registry import create, list_models, register_model
from saftune.models.zero_shot import DualEncoderClassifier

__all__ = ["Classifier", "DualEncoderClassifier", "classification_loss", "create", "list_models", "register_model"]
