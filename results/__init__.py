"""Reference data shipped with bpfree as `bpfree.results` (package data, read through
importlib.resources): `published/published.csv`, the papers' numbers with their setups, and
`baseline/ci.csv`, the CI gate's reference measurements. Run folders (`runs/`, `sweeps/`)
and committed evidence (`evidence/`) live beside them in a clone and are not installed."""

if __name__ != "bpfree.results":  # the same files under a second name would be loaded twice
    raise ImportError(f"this folder is installed as bpfree.results: import bpfree.results, not {__name__}")
