"""Where a number came from: bpfree's version and commit, and the machine it ran on.

The commit is bpfree's own, never that of the directory a command runs in: from the git
clone the package was installed from when it is an editable install of one, else from the
package version, which setuptools-scm stamps with the commit at build time.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

from bpfree import __version__


def source_checkout() -> Path | None:
    """The root of the bpfree git clone this code runs from, or None for an installed wheel."""
    root = Path(__file__).resolve().parents[1]
    project = root / "pyproject.toml"
    if (root / ".git").exists() and project.is_file() and 'name = "bpfree"' in project.read_text():
        return root
    return None


def git_commit() -> str:
    """The commit of the code that runs, with `-dirty` when tracked files differ from it."""
    root = source_checkout()
    if root is None:
        # setuptools-scm versions look like 0.1.dev12+g1a2b3c4 (.dYYYYMMDD when built dirty)
        match = re.search(r"\+g([0-9a-f]{7,40})(\.d\d{8})?", __version__)
        if not match:
            return f"unknown (version {__version__})"
        return match.group(1) + ("-dirty" if match.group(2) else "")
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty else "")


def environment(device: torch.device) -> dict[str, Any]:
    """Everything a reader needs to judge a number: versions, device, threads."""
    return {
        "bpfree": __version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
