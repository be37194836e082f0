"""Offline training: data streaming, weighting, metrics, the trainer and synthetic logs."""
