"""Where a NoProp-DT training step's CPU time goes, against the machine's matmul rate.

    python3 benchmarks/cpu_step_breakdown.py [--threads 2] [--rounds 5] [--out FILE.csv]

Issue 18 asks for 60% of the float32 matmul rate on every CPU. This script measures, in one
process and alternating rounds (so that a noisy machine hits every variant alike), the best
time of:

- `step`: one `noprop-dt` training step, `paper` preset, batch 128, MNIST shapes (what
  `bpfree cost` times);
- `step, no dropout`: the same with `dropout = 0`, so the difference is what drawing the dropout
  masks and applying them costs;
- `convolutions`: only the T blocks' three convolutions, forward and backward (the input's
  gradient too where the block's gradient needs it), on the activations' real shapes: the
  FLOPs that dominate the step, run by torch's own kernels.

Each row gives its FLOPs over its time as a fraction of the matmul rate measured in the same
process. If the convolutions alone cannot reach a fraction, the step cannot either: that is the
ceiling no change outside the convolution kernels can lift.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import pandas as pd
import torch
from bpfree.methods import get_method
from torch import nn

from bpfree.cost import build_method, matmul_flops_per_s
from bpfree.harness import measure_costs
from bpfree.measure import count_flops
from bpfree.provenance import cpu_name
from bpfree.version import git_commit

CPU = torch.device("cpu")


def step_variant(batch: int, overrides: dict) -> tuple[Callable[[], object], float]:
    """One `noprop-dt` `paper` training step with `overrides`, and its FLOPs as the harness
    records them."""
    method, x, y = build_method("noprop-dt", "mnist", CPU, batch, "paper", overrides)
    flops = measure_costs(method, x, y, CPU)["flops_train_step"]
    method.train()
    method.step(x, y)  # optimiser state and kernel selection
    return (lambda: method.step(x, y)), flops


def conv_variant(blocks: int, batch: int) -> tuple[Callable[[], object], float]:
    """`blocks` blocks' three convolutions forward and backward on their activations' shapes
    (the first one's input needs no gradient), and their FLOPs by the same counter."""
    shapes = [(1, 32, 28), (32, 64, 13), (64, 128, 11)]
    convs = [nn.Conv2d(c_in, c_out, 3) for c_in, c_out, _ in shapes]
    inputs = [torch.randn(batch, c_in, hw, hw, requires_grad=i > 0)
              for i, (c_in, _, hw) in enumerate(shapes)]

    def run() -> None:
        for _ in range(blocks):
            for conv, x in zip(convs, inputs):
                conv(x).sum().backward()

    run()
    return run, float(count_flops(run))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", help="also write the rows to this CSV file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    blocks = get_method("noprop-dt").config_for("paper").T
    variants = {"step": step_variant(args.batch, {}),
                "step, no dropout": step_variant(args.batch, {"dropout": 0.0}),
                "convolutions": conv_variant(blocks, args.batch)}
    best = {name: float("inf") for name in variants}
    for _ in range(args.rounds):
        for name, (run, _) in variants.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    rate = matmul_flops_per_s(CPU)

    frame = pd.DataFrame([{"what": name, "ms": best[name] * 1e3, "gflop": flops / 1e9,
                           "gflop_s": flops / best[name] / 1e9,
                           "of_matmul_rate": flops / best[name] / rate}
                          for name, (_, flops) in variants.items()])
    frame["matmul_gflop_s"] = rate / 1e9
    frame["threads"] = args.threads
    frame["blocks"] = blocks
    frame["cpu"] = cpu_name()
    frame["torch"] = torch.__version__
    frame["load_avg_1min"] = os.getloadavg()[0]
    frame["git_commit"] = git_commit()
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.out:
        frame.to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
