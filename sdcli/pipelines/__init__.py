"""Generators over a model family's stages: ``image.py`` (text to image)."""
