"""A from-scratch Vision Transformer for CIFAR-10, weight-for-weight compatible with timm."""

from vit.model import VisionTransformer, load_timm_weights

__all__ = ["VisionTransformer", "load_timm_weights"]
