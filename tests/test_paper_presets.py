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
    "noprop-ct": (torch.optim.Adam, {"eta": 1.0, "inference_steps": 1000}),
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
