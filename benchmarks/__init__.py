"""How methods are measured: datasets, the harness, suites, the `bpfree` CLI, asv benchmarks."""
