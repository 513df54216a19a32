"""LightCLIP: a training pipeline for lightweight CLIP models."""

__version__ = "0.1.0"
