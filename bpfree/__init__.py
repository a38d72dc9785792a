"""bpfree: a comparative benchmark suite for training without end-to-end backpropagation.

The application (data, harness, measurement, records, the `bpfree` command, sweeps, tuning,
the CI gate) lives here; the methods and the report generators are installed with it as
`bpfree.methods` and `bpfree.reports` from the repository's `methods/` and `reports/`
folders, and the reference data (published numbers, the gate's baseline) as
`bpfree.results` from `results/` (see DEVELOPERS.md).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _installed_version  # not `version`: bpfree.version

try:
    __version__ = _installed_version("bpfree")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
