from .gated_image_classifier import GatedImageClassifier

__all__ = ['GatedImageClassifier']
