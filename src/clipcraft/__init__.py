"""clipcraft: train, evaluate and use CLIP models built from pretrained image and text towers."""

__version__ = "0.1.0"
