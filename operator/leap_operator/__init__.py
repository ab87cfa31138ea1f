"""Leap: the TrainingRun operator, its API, rendering and the `leap` CLI."""

__version__ = "0.1.0"
