"""Measurement functions on cases with a known answer."""

from __future__ import annotations

import torch
from torch import nn

from bpfree.measure import count_flops, peak_step_memory, saved_tensor_bytes, state_bytes


def test_flops_of_a_linear_layer():
    layer = nn.Linear(100, 50, bias=False)
    x = torch.randn(32, 100)
    assert count_flops(lambda: layer(x)) == 2 * 32 * 100 * 50
    # forward + backward of a linear layer on a leaf input: 3x the forward matmul
    xg = x.clone().requires_grad_()
    assert count_flops(lambda: layer(xg).sum().backward()) == 3 * 2 * 32 * 100 * 50


def test_saved_bytes_of_a_known_graph_exclude_parameters():
    layer = nn.Linear(100, 50)
    x = torch.randn(32, 100)
    # Linear saves its input (32x100 floats); ReLU saves its output (32x50 floats).
    peak, total = saved_tensor_bytes(lambda: layer(x).relu().sum().backward(), exclude=layer.parameters())
    assert peak == total == 4 * (32 * 100 + 32 * 50)


def test_saved_bytes_peak_is_what_is_held_at_once():
    a, b = nn.Linear(100, 100), nn.Linear(100, 100)
    params = [*a.parameters(), *b.parameters()]
    x = torch.randn(8, 100)
    one = 4 * (8 * 100 + 8 * 100)

    def separately():  # backward each layer before the next forward: memory is released
        for layer in (a, b):
            layer(x).relu().sum().backward()

    def chained():  # one graph through both layers: everything is held until backward
        b(a(x).relu()).relu().sum().backward()

    assert saved_tensor_bytes(separately, exclude=params) == (one, 2 * one)
    peak, total = saved_tensor_bytes(chained, exclude=params)
    assert peak == total == 4 * 3 * 8 * 100  # x, relu(a x) (saved by ReLU and by b once), out


def test_cpu_peak_counts_transient_tensors_and_persistent_state():
    x = torch.randn(1000)  # persistent, 4,000 bytes

    def step():
        y = x * 2  # 4,000 bytes alive
        z = y + 1  # 8,000 bytes alive at once
        del y, z
        w = x * 3  # 4,000 bytes again: the peak stays 8,000
        return w.sum()

    peak = peak_step_memory(step, torch.device("cpu"), persistent=[x])
    assert peak.kind == "cpu-live-tensors"
    assert peak.bytes == state_bytes([x]) + 8000
