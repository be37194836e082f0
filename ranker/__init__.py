"""ranker: multi-task recommendation ranking — training, serving and monitoring."""

__version__ = "0.1.0"
