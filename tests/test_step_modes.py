"""How a training step is executed (`step=eager|graph|auto`): the choice changes speed only.

CUDA graphs need a GPU; the tests marked `cuda` run where one exists (the device checks in
benchmarks/gpu/), the others pin what holds on any machine: the mode's resolution and its
one-line errors, that `Method.step` in eager mode is `train_step`, that copies and reloads
never carry a recorded graph, and that the mode round-trips through checkpoints and resume.
"""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch
from bpfree.methods import ConfigError, Task
from bpfree.methods.base import GRAPH_WARMUP

from bpfree.data import Dataset, make_separable
from bpfree.harness import Budget, Unit, run_units
from tests.conftest import METHODS, make_method

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# The methods that declare their step capturable, checked on the GPU below.
CAPTURABLE = ["backprop", "backprop-blocks", "noprop-dt", "noprop-ct", "noprop-fm", "fg-w",
              "fg-a", "lg-fg-a"]


@pytest.mark.parametrize("name", METHODS)
def test_auto_is_eager_on_cpu_and_graph_is_refused_there(name):
    assert make_method(name).step_mode == "eager"
    with pytest.raises(ConfigError, match="step=graph .*needs --device cuda"):
        make_method(name, step="graph")


def test_capturable_methods_are_the_ones_listed():
    assert sorted(n for n in METHODS if make_method(n).capturable()) == sorted(CAPTURABLE)
    assert not make_method("noprop-dt", order="block-by-block").capturable()


def test_eager_step_is_train_step(separable):
    x, y, _, _ = separable
    a, b = make_method("noprop-dt"), make_method("noprop-dt")
    torch.manual_seed(3)
    out_a = a.step(x[:32], y[:32])
    torch.manual_seed(3)
    out_b = b.train_step(x[:32], y[:32])
    assert {k: float(v) for k, v in out_a.items()} == {k: float(v) for k, v in out_b.items()}


def test_copies_and_reloads_carry_no_recorded_graph():
    method = make_method("backprop")
    method._graphs[("fake",)] = object()
    method._warm[("fake",)] = GRAPH_WARMUP
    clone = copy.deepcopy(method)
    assert clone._graphs == {} and clone._warm == {}
    assert method._graphs  # the original keeps its own
    method.load_state_dict(clone.state_dict())
    assert method._graphs == {} and method._warm == {}  # new optimiser tensors: record anew


def test_step_mode_is_recorded_and_resume_keeps_it(tmp_path, monkeypatch):
    """An interrupted unit resumes with the step mode it started with (it is part of the
    unit's configuration, so of its id) and records the mode that ran."""
    from bpfree.methods.backprop import Backprop

    data = {"synthetic": Dataset("synthetic", 4, *make_separable(128, 64, 4, (1, 16, 16), seed=2))}
    unit = Unit("backprop", "synthetic", 0, "default", (("arch", "mlp"), ("step", "eager")))
    budget = Budget(epochs=2, batch_size=32, warmup_steps=0)
    original, calls = Backprop.train_step, {"n": 0}

    def interrupted(self, x, y):
        calls["n"] += 1
        if calls["n"] == 4 + 4 + 2:  # 4 cost-measurement steps, epoch 1, 2 steps into epoch 2
            raise KeyboardInterrupt
        return original(self, x, y)

    monkeypatch.setattr(Backprop, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_units([unit], data, budget, tmp_path)
    assert (tmp_path / "units" / unit.id / "checkpoint.pt").is_file()
    monkeypatch.setattr(Backprop, "train_step", original)
    run_units([unit], data, budget, tmp_path)
    summary = pd.read_csv(tmp_path / "summary.csv").iloc[0]
    assert summary["status"] == "finished" and summary["epochs_done"] == 2
    assert summary["step_mode"] == "eager"
    assert json.loads(summary["config"])["step"] == "eager"


@pytest.fixture
def exact_cuda_kernels():
    """TF32 off and deterministic cuDNN algorithms for the test, restored after it. With
    cuDNN's default TF32 convolutions and free algorithm choice, eager and replayed CNN steps
    drifted apart by about 1e-4 in 6 AdamW steps on an H200 (docs/gpu.md): rounding, which
    would hide a real difference at this test's tolerance."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
     torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = saved


@cuda
@pytest.mark.parametrize("name", CAPTURABLE)
def test_graph_steps_equal_eager_steps_on_cuda(name, exact_cuda_kernels):
    """The same steps from the same state, eager and as replays of a recorded graph, end at
    the same parameters to float tolerance. Random numbers (dropout, noisy labels) come from
    CUDA's generator in both, from the same state."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    x = torch.randn(64, 1, 16, 16, device=device)
    y = torch.arange(64, device=device) % 4
    models = {}
    for mode in ("eager", "graph"):
        torch.manual_seed(0)
        cls = type(make_method(name))
        task = Task((1, 16, 16), 4, device, 0, train_sample=(x, y))
        method = cls(task, cls.config_for("quick", {"step": mode}))
        method.train()
        torch.manual_seed(1)
        for _ in range(GRAPH_WARMUP + 4):
            out = method.step(x, y)
        torch.cuda.synchronize()
        assert torch.isfinite(out["loss"]), f"{name} {mode}: loss {out['loss']}"
        models[mode] = method
    assert models["graph"]._graphs, "graph mode recorded nothing"
    for (key, a), b in zip(models["eager"].model.state_dict().items(),
                           models["graph"].model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4), f"{name}: {key} differs"
