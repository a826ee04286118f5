"""lorafleet: train and serve very many LoRA policies over a few resident base models."""

__version__ = "0.1.0"
