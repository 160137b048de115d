"""Choosing the torch device a command runs its model on (--device): one rule for every command."""
from __future__ import annotations

import torch


def pick_device(requested: str | None, local_rank: int | None = None) -> torch.device:
    """--device, or cuda when available; a one-line ValueError for one that cannot be used here. With
    `local_rank` (a torchrun job), a cuda device without an index is the rank's own GPU."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"--device {requested!r}: not a torch device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {requested}: CUDA is not available here; use --device cpu")
        if device.index is None:
            if local_rank is not None:
                device = torch.device("cuda", local_rank % torch.cuda.device_count())
        elif device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s)")
    return device
