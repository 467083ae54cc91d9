"""numclip: teach CLIP to predict ordered numbers (age, decade, aesthetics grade) from images."""

__version__ = "0.3.0"
