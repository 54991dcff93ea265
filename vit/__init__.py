"""A from-scratch Vision Transformer for CIFAR-10, weight-for-weight compatible with timm."""

from vit.checkpoint import Checkpoint, load_checkpoint, load_model
from vit.model import VisionTransformer
from vit.pretrained import load_timm_weights

__all__ = ["Checkpoint", "VisionTransformer", "load_checkpoint", "load_model", "load_timm_weights"]
