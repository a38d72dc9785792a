"""Shared fixtures: small tasks built in-process, so no test needs downloaded data."""

from __future__ import annotations

import os

import pytest
import torch
from bpfree.methods import Method, Task, all_methods

from bpfree.data import make_separable

RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
os.environ.update(RAY_ENV)

METHODS = list(all_methods())
# A custom Ray resource standing in for one GPU, so GPU sharing is tested on CPU machines.
FAKE_GPU = "fake_gpu"


def make_method(name: str, seed: int = 0, shape=(1, 16, 16), num_classes: int = 4, **overrides) -> Method:
    """A method on a small task with its `quick` preset plus `overrides`."""
    cls = all_methods()[name]
    torch.manual_seed(seed)
    data = make_separable(64, 0, num_classes, shape, seed=seed)
    task = Task(shape, num_classes, torch.device("cpu"), seed, train_sample=(data[0], data[1]))
    return cls(task, cls.config_for("quick", overrides))


@pytest.fixture(scope="session")
def separable():
    """(train_x, train_y, test_x, test_y): 4 classes of 1x16x16 noisy templates."""
    return make_separable(n_train=512, n_test=256, num_classes=4, shape=(1, 16, 16), seed=1)


@pytest.fixture(scope="session")
def ray_cluster():
    """A private 2-CPU Ray cluster for the whole session (starting one takes seconds).

    `address="local"` never joins a cluster someone else started on this machine; usage
    statistics and the dashboard are off, and it talks over 127.0.0.1 only (RAY_ENV, set
    before anything imports ray), so nothing reaches the network. It holds one `FAKE_GPU`.
    """
    import ray

    ray.init(address="local", num_cpus=2, resources={FAKE_GPU: 1}, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
