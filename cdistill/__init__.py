"""cdistill: concept-sensitive fine-tuning of vision models (Lightning + Hydra)."""

__version__ = "0.1.0"
