"""Waste-image classification with PyTorch Lightning and pseudo-labeling."""

__version__ = "0.1.0"
