"""Checkpoints: a unit's state after its last finished epoch, and a trained model kept for
`bpfree evaluate`. Written atomically like every record (bpfree.records)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bpfree.records import atomic_write


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda p: torch.save(state, p))


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
