"""Named comparisons: which methods, on what data, with what budget.

Every method in a suite gets the same data, epochs, batch size and seeds; only its own
hyperparameter preset differs (each method's `quick` or `paper` preset).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    dataset: str
    epochs: int
    seeds: tuple[int, ...]
    preset: str
    batch_size: int = 128
    methods: tuple[str, ...] | None = None  # None: every registered method


SUITES: dict[str, Suite] = {
    suite.name: suite
    for suite in [
        Suite(
            "quick",
            "every method on mnist-5k, 2 epochs, quick presets, seed 0 (a few minutes on 2 CPU cores)",
            "mnist-5k",
            epochs=2,
            seeds=(0,),
            preset="quick",
        ),
        Suite(
            "paper-mnist",
            "NoProp paper's MNIST comparison: NoProp DT/CT/FM and its backprop baseline, "
            "paper presets, 3 seeds, 100 epochs (needs --data-dir; hours on a GPU)",
            "mnist",
            epochs=100,
            seeds=(0, 1, 2),
            preset="paper",
            methods=("backprop-blocks", "noprop-dt", "noprop-ct", "noprop-fm"),
        ),
    ]
}
