"""Checkpoints: a unit's state after its last finished epoch, and a trained model kept for
`bpfree evaluate`. Written atomically like every record (bpfree.records).

They are read with `torch.load(weights_only=True)`, which rebuilds tensors and plain Python
containers and refuses any other object: a planted or tampered file cannot run code when a
run resumes or a model is evaluated (a full unpickle would call whatever the file names).
Every method's state (model, optimisers, step counters) and the harness's own (rows, RNG
state) are made of such values only; tests/test_methods_contract.py loads each method's
state through this path. A file that cannot be loaded, corrupt or unsafe, is one
RecordsError naming it and saying to delete it.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch

from bpfree.records import RecordsError, atomic_write

# What a unit's checkpoint.pt holds (bpfree.harness.save_progress).
CHECKPOINT_KEYS = ("method", "rows", "cum_time", "images", "rng")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Serialise in memory, then write the bytes with a plain file write: a full disk is then
    an OSError (ENOSPC) that atomic_write reports as one line. torch.save reports a failed
    write, to a path or to a file object on a really full file system, as an unrelated
    RuntimeError ("unexpected pos"), and the user would never learn the disk was full."""
    buffer = io.BytesIO()
    torch.save(state, buffer)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            handle.write(buffer.getbuffer())

    atomic_write(path, write)


def load_state(path: Path, keys: tuple[str, ...], hint: str) -> dict[str, Any]:
    """A dict of tensors and plain values saved by `save_checkpoint`, holding `keys`; any
    other file is a RecordsError naming it, ending with `hint` (what deleting it means)."""
    try:
        with warnings.catch_warnings():  # e.g. about the pickle protocol of a foreign file
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, not torch's format, or unsafe to load
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].strip()
        first = first.split(". ")[0]
        if "Weights only load failed" in first or "Unsupported global" in str(exc):
            why = ("it asks to build objects other than tensors and plain values, which could run "
                   "code: not loaded")
        else:
            why = f"corrupt or truncated: {first[:120]}"
        raise RecordsError(f"{path} cannot be loaded ({why}); delete it: {hint}") from None
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise RecordsError(f"{path} is not a bpfree checkpoint (it lacks "
                           f"{', '.join(keys)}); delete it: {hint}")
    return state


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """A unit's resume point, or None if it has none."""
    if not path.is_file():
        return None
    return load_state(path, CHECKPOINT_KEYS,
                      "the unit then starts again from its first epoch")
