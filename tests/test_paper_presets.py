"""`paper` presets hold the papers' (or the authors' released configs') values.

Each expected value below is written as the source prints it, with the source named, so that
a preset drifting from its paper fails here. The feedback-alignment presets (biotorch's
schedule) are pinned in tests/test_feedback_alignment.py.
"""

from __future__ import annotations

import pytest
import torch
from bpfree.methods import Task, all_methods, get_method

from bpfree.suites import SUITES

# NoProp (Li, Teh, Pascanu 2025), Table 4: batch 128; optimiser, lr, weight decay; T (DT and
# its backprop baseline) or inference steps (CT, FM); eta (DT 0.1, CT 1).
NOPROP_TABLE4 = {
    "noprop-dt": (torch.optim.AdamW, {"T": 10, "eta": 0.1}),
    "backprop-blocks": (torch.optim.AdamW, {"T": 10}),
    # CT's solver is not in the paper: `mean` was chosen on validation (docs/noprop.md)
    "noprop-ct": (torch.optim.Adam, {"eta": 1.0, "inference_steps": 1000, "sampler": "mean"}),
    "noprop-fm": (torch.optim.Adam, {"inference_steps": 1000}),
}


@pytest.mark.parametrize("name", list(NOPROP_TABLE4))
def test_noprop_paper_presets_are_table_4(name):
    optimiser, values = NOPROP_TABLE4[name]
    cls = get_method(name)
    config = cls.config_for("paper")
    for key, value in {"lr": 1e-3, "weight_decay": 1e-3, **values}.items():
        assert getattr(config, key) == value, key
    # the optimiser the method builds is the table's, with its lr and weight decay
    small = {"T": 2} if "T" in values else {}
    method = cls(Task((1, 16, 16), 4), cls.config_for("paper", small))
    (opt,) = method.optimizers.values()
    assert type(opt) is optimiser
    assert {(g["lr"], g["weight_decay"]) for g in opt.param_groups} == {(1e-3, 1e-3)}


def test_the_paper_mnist_suite_is_table_4s_mnist_budget():
    suite = SUITES["paper-mnist"]
    assert (suite.dataset, suite.epochs, suite.batch_size, suite.preset) == ("mnist", 100, 128,
                                                                             "paper")
    assert set(suite.methods) == set(NOPROP_TABLE4)
    assert len(suite.seeds) == 3  # "3 seeds x 5 inference runs"


# Meulemans et al. 2020, the authors' final_configs/mnist_DTP.py and mnist_DDTPlinear.py
# (meulemansalex/theoretical_framework_for_target_propagation): Adam, batch 128, 5 x 256,
# `normalize_lr` (the forward lr is divided by the target step) and a target step on the
# batch-mean loss (ours is per sample: divided by the batch size 128).
MEULEMANS = {
    "dtp": {"lr": 6.185037324617764e-05, "target_stepsize": 0.21951187497378802,
            "lr_fb": 0.0019584756448113774, "sigma": 0.08372453893037193, "feedback_wd": 0.0},
    "ddtp-linear": {"lr": 2.0354415171962153e-05, "target_stepsize": 0.06096940412767466,
                    "lr_fb": 0.00016378232822128718, "sigma": 0.0907524824699504,
                    "feedback_wd": 5.836204840235672e-07},
}


@pytest.mark.parametrize("name", list(MEULEMANS))
def test_target_propagation_paper_presets_are_meulemans_configs(name):
    raw = MEULEMANS[name]
    config = get_method(name).config_for("paper")
    assert (config.depth, config.width) == (5, 256)
    rel = 5e-3  # the presets keep three significant digits
    assert config.lr == pytest.approx(raw["lr"] / raw["target_stepsize"], rel=rel)
    assert config.beta == pytest.approx(raw["target_stepsize"] / 128, rel=rel)
    assert config.feedback_lr == pytest.approx(raw["lr_fb"], rel=rel)
    assert config.noise == pytest.approx(raw["sigma"], rel=rel)
    assert config.feedback_weight_decay == pytest.approx(raw["feedback_wd"], rel=rel)
    assert config.weight_decay == 0.0  # forward_wd 0
    # DTP updates its feedback once per batch ("parallel"); DDTP-linear's extra feedback-only
    # epoch is approximated by a second feedback iteration per batch (docs/target_prop.md)
    assert config.feedback_iterations == (1 if name == "dtp" else 2)
    assert get_method(name).schedule == "parallel"


def test_forward_gradient_claims_no_paper_preset():
    """Neither forward-gradient paper gives an MLP configuration we could verify (Ren et al.
    train LocalMixer, docs/forward_gradient.md): no preset may claim to be the paper's."""
    for name in ("fg-w", "fg-a", "lg-fg-a"):
        assert "paper" not in all_methods()[name].presets


# Hinton 2022 (supervised MNIST: 4 x 2000 ReLU, 60 epochs, goodness of all but the first hidden
# layer, hard negatives) with what the paper leaves open from the official Matlab code
# (ffnew.m: epsilon 0.01, delay 0.9, wc 0.001, epsilonsup 0.1, supwc 0.003, lambdamean 0.03,
# labelstrength 1, threshold = number of units, linear decay over the second half).
FF_PAPER = {"width": 2000, "depth": 4, "goodness": "sum", "threshold": 1.0, "negatives": "hard",
            "goodness_from": 1, "label_strength": 1.0, "peer_norm": 0.03, "optimizer": "sgd",
            "lr": 0.01, "momentum": 0.9, "weight_decay": 0.001, "head_lr": 0.1,
            "head_weight_decay": 0.003, "schedule_epochs": 60}
# Dellaferrera & Kreiman 2022, the reference code's MNIST command (GiorgiaD/PEPITA): 1 x 1024
# ReLU without biases, SGD lr 0.1 momentum 0.9, keep rate 0.9, F = 0.05 x He-uniform,
# lr x 0.1 after epochs 60 and 90.
PEPITA_PAPER = {"width": 1024, "depth": 1, "bias": False, "lr": 0.1, "momentum": 0.9,
                "dropout": 0.1, "f_scale": 0.05, "decay_epochs": "60,90", "decay_factor": 0.1,
                "weight_decay": 0.0}


@pytest.mark.parametrize("name,values", [("ff", FF_PAPER), ("pepita", PEPITA_PAPER)])
def test_forward_only_paper_presets_are_the_papers(name, values):
    config = get_method(name).config_for("paper")
    for key, value in values.items():
        assert getattr(config, key) == value, key


@pytest.mark.parametrize("source,preset", [
    ("Hinton 2022 (The Forward-Forward Algorithm: Some", ("ff", "paper")),
    ("Dellaferrera & Kreiman 2022 (Error-driven", ("pepita", "paper")),
    ("cybertronai/hinton-problems", ("ff", "small")),
])
def test_published_setups_are_the_presets_that_reproduce_them(source, preset):
    """The published MNIST rows a preset reproduces name that preset's network and settings,
    so that a run of the preset for the stated epochs is joined to them and nothing else."""
    from bpfree.reports.published import parse_method, read_published

    published = read_published()
    rows = published[published["source"].str.startswith(source)
                      & (published["dataset"] == "mnist")
                      & published["method"].str.startswith(preset[0])
                      & ~published["network"].str.startswith("conv")]
    assert len(rows) == 1
    row = rows.iloc[0]
    cls = get_method(preset[0])
    config = cls.config_for(preset[1])
    assert cls.network_of(config) == row["network"]
    name, wanted = parse_method(row["method"])
    assert name == cls.name and wanted
    for key, value in wanted.items():
        assert getattr(config, key) == value, key
