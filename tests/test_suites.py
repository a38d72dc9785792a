"""Network ids and backprop twins: every method is compared with backprop on its own network."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
from bpfree.methods import Task, all_methods, get_method
from torch import nn

from bpfree.cli import main
from bpfree.harness import Unit
from bpfree.suites import SUITES, add_twins, twin

# The methods whose network no backprop method trains (the NoProp paper's baseline for the
# continuous-time block is the adjoint method, which bpfree does not implement).
NO_TWIN = {"noprop-ct", "noprop-fm"}
ID = re.compile(r"^[a-z0-9]+(-[A-Za-z0-9]+)*$")


def presets():
    return [(name, preset) for name, cls in all_methods().items() for preset in cls.presets]


@pytest.mark.parametrize("name,preset", presets())
def test_every_preset_names_its_network_and_has_a_twin_on_it(name, preset):
    cls = get_method(name)
    config = cls.config_for(preset)
    network = cls.network_of(config)
    assert ID.match(network), network
    found = twin(cls, config)
    if name in NO_TWIN:
        assert found is None
        return
    assert found is not None, f"{name} ({preset}) has no backprop twin for {network}"
    base, overrides = found
    base_cls = get_method(base)
    assert base_cls.network_of(base_cls.config_for("default", overrides)) == network


def linear_shapes(model: nn.Module) -> list[tuple[int, ...]]:
    return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("name,preset", [("fg-a", "quick"), ("dtp", "paper"), ("fa", "quick"),
                                         ("pepita", "quick"), ("ff", "quick")])
def test_a_twin_builds_the_same_layers(name, preset):
    """The id is not a label only: the twin's layers are the method's predicting network
    (FF has no output layer, so its twin's first layers are FF's)."""
    task = Task((1, 28, 28), 10)
    cls = get_method(name)
    method = cls(task, cls.config_for(preset))
    base, overrides = twin(cls, method.config)
    reference = get_method(base)(task, get_method(base).config_for("default", overrides))
    model = method.model
    net = model["net"] if isinstance(model, nn.ModuleDict) else getattr(model, "net", model)
    shapes, twin_shapes = linear_shapes(net), linear_shapes(reference.model)
    if name == "ff":
        twin_shapes = twin_shapes[:-1]
        shapes = [s for s in shapes if s[0] != 10]  # FF's optional hard-negative head
    assert shapes == twin_shapes
    biases = {m.bias is None for m in net.modules() if isinstance(m, nn.Linear)}
    assert biases == {m.bias is None for m in reference.model.modules() if isinstance(m, nn.Linear)}


def test_the_quick_suite_runs_a_twin_for_every_method_that_has_one():
    suite = SUITES["quick"]
    assert suite.twins
    units = [Unit(m, suite.dataset, s, suite.preset) for m in all_methods() for s in suite.seeds]
    units += add_twins(units)
    networks = {(u.dataset, u.seed, get_method(u.method).network_of(u.config())): u
                for u in units if u.method in ("backprop", "backprop-blocks")}
    for u in units:
        key = (u.dataset, u.seed, get_method(u.method).network_of(u.config()))
        assert (key in networks) != (u.method in NO_TWIN), u
    # the twins it needs: backprop on the CNN (its own preset), on the 2 x 256 MLP (fg, fa,
    # target propagation, ff) and on PEPITA's bias-free 1 x 256 MLP; backprop-blocks is in
    # the suite already, next to noprop-dt
    assert sorted(k[2] for k in networks) == ["cnn", "mlp-1x256-relu-nobias", "mlp-2x256-relu",
                                              "noprop-dt-T3-one-hot"]


def test_add_twins_adds_each_missing_twin_once():
    fg = Unit("fg-a", "synthetic", 0, "quick")
    fg512 = Unit("fg-w", "synthetic", 0, "quick", (("width", 512),))
    backprop_mlp = Unit("backprop", "synthetic", 0, "default", (("arch", "mlp"),))
    added = add_twins([fg, Unit("lg-fg-a", "synthetic", 0, "quick"), fg512,
                       Unit("noprop-ct", "synthetic", 0, "quick")])
    assert [(u.method, u.preset, dict(u.overrides)) for u in added] == [
        ("backprop", "quick", {"arch": "mlp", "width": 256, "depth": 2}),
        ("backprop", "quick", {"arch": "mlp", "width": 512, "depth": 2})]
    # a backprop unit of the same configuration is the twin already
    assert add_twins([backprop_mlp, fg]) == []
    # a preset the baseline lacks falls back to its default
    assert add_twins([Unit("ff", "synthetic", 0, "small")])[0].preset == "default"


def test_run_with_twins_reports_each_method_against_its_twin(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--methods", "fg-a,pepita", "--twins", "--dataset", "synthetic",
                 "--epochs", "1", "--set", "tangents=2", "--out", str(out),
                 "--device", "cpu"]) == 0
    summary = pd.read_csv(out / "summary.csv")
    configs = {(r.method, r.network): json.loads(r.config) for r in summary.itertuples()}
    assert set(configs) == {("fg-a", "mlp-2x256-relu"), ("pepita", "mlp-1x256-relu-nobias"),
                            ("backprop", "mlp-2x256-relu"),
                            ("backprop", "mlp-1x256-relu-nobias")}
    assert configs[("backprop", "mlp-1x256-relu-nobias")]["bias"] is False
    meta = json.loads((out / "meta.json").read_text())
    assert len(meta["spec"]["twins"]) == 2
    cost = pd.read_csv(out / "report" / "cost.csv").set_index("variant")
    assert cost.loc["fg-a", "twin"].startswith("backprop (")
    assert cost.loc["fg-a", "flops_train_step_ratio"] > 1
    text = capsys.readouterr().out
    ratios = text.split("## Cost relative")[1].split("## ")[0]
    assert "| no backprop twin |" not in ratios and "| (itself) |" in ratios
