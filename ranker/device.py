"""Where tensors go: one rule for training (``train.device``) and serving (``--device``)."""

from __future__ import annotations

import torch

from ranker.errors import RankerError


def resolve_device(choice: str, key: str) -> torch.device:
    """``auto``: CUDA when torch sees a device, else the CPU; ``cuda`` without one is an error
    naming ``key``, the setting it came from.

    Example:
        >>> resolve_device("cpu", "train.device")
        device(type='cpu')
    """
    if choice == "cuda" and not torch.cuda.is_available():
        raise RankerError(f"{key}: 'cuda' was asked for but torch sees no CUDA device; use auto or cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)
