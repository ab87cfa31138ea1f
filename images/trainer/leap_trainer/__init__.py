"""leap-train: the training runtime baked into Leap's images."""

__version__ = "0.1.0"
