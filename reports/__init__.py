"""Turn run records into tables and figures."""

if __name__ != "bpfree.reports":  # the same files under a second name would be loaded twice
    raise ImportError(f"this folder is installed as bpfree.reports: import bpfree.reports, not {__name__}")
