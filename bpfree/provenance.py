"""Where a number came from: bpfree's version and commit, and the machine it ran on.

The commit is bpfree's own, never that of the directory a command runs in: from the git
clone the package was installed from when it is an editable install of one, else from the
package version, which setuptools-scm stamps with the commit at build time.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from bpfree.version import code_digest, code_version, git_commit


def environment(device: torch.device) -> dict[str, Any]:
    """Everything a reader needs to judge a number: versions, device, threads."""
    return {
        "bpfree": code_version(),
        "git_commit": git_commit(),
        "code_digest": code_digest(),
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
