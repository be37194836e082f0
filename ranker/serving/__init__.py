"""Serving: the HTTP app (``create_app``) over a bundle. Imports nothing from ``ranker.training``."""

from ranker.serving.app import create_app
from ranker.serving.settings import ServingSettings

__all__ = ["ServingSettings", "create_app"]
