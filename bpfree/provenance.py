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


def cpu_name() -> str:
    """The CPU's model name where Linux says it ("AMD EPYC 7B13", "Intel(R) Xeon(R)
    Processor"), else what `platform` knows: the same step runs at very different fractions
    of the matmul rate on two x86-64 CPUs, so "x86_64" alone does not say which ran."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    """The GPU's name on CUDA, else the CPU's."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return cpu_name()


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
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
