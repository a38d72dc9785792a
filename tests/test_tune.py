"""`bpfree tune`: equal-budget search on a validation split, and `preset=tuned` reading it back."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from bpfree.methods import ConfigError, all_methods
from bpfree.methods.backprop import Backprop

from bpfree import data as data_module
from bpfree.cli import main
from bpfree.data import DatasetInfo, make_separable
from bpfree.sweep import load_sweep
from bpfree.tune import ray_search_space, trial, tuning_split


class Untouchable:
    """Stands in for the test split: any use of it (indexing, len, .to, shape) fails."""

    def __getattr__(self, name):
        raise AssertionError(f"the test split was touched ({name})")

    def __len__(self):
        raise AssertionError("the test split was touched (len)")

    def __getitem__(self, key):
        raise AssertionError("the test split was touched (indexing)")


@pytest.fixture
def untouchable_test_split(monkeypatch):
    """`synthetic` with a test split that fails the test if anything reads it."""
    def load(data_dir, download):
        train_x, train_y, _, _ = make_separable(256, 0, 4, (1, 8, 8), seed=3)
        return train_x, train_y, Untouchable(), Untouchable()

    info = DatasetInfo("synthetic", "poisoned test split", 4, 0.9, load)
    monkeypatch.setitem(data_module.DATASETS, "synthetic", info)


def test_a_trial_sees_only_train_and_validation(untouchable_test_split):
    split = tuning_split("synthetic", None, 0.25)
    assert not any("test" in name for name in vars(split))
    assert len(split.val_y) == 64 and len(split.train_y) == 192
    reports = []
    trial({"lr": 3e-3}, method="backprop", dataset="synthetic", preset="default",
          fixed={"arch": "mlp", "width": 16}, epochs=2, batch_size=32, device="cpu", seed=0,
          data_dir=None, val_fraction=0.25, report=reports.append)
    assert [r["epoch"] for r in reports] == [1, 2]
    assert all(set(r) == {"val_acc", "epoch", "diverged"} for r in reports)
    assert reports[-1]["val_acc"] > 0.5


@pytest.mark.parametrize("cls", all_methods().values(), ids=list(all_methods()))
def test_every_method_declares_a_valid_search_space(cls):
    """Ray gets one distribution per declared key, with the declared bounds, and every value
    it can draw makes a valid configuration of the method; a key fixed by --set is left out."""
    space = ray_search_space(cls, {})
    assert set(space) == set(cls.search_space)
    for key, (kind, *args) in cls.search_space.items():
        domain = space[key]
        if kind == "choice":
            assert list(domain.categories) == list(args[0])
        else:
            assert (domain.lower, domain.upper) == tuple(args), key
    for seed in range(20):
        sample = {key: domain.sample(random_state=seed) for key, domain in space.items()}
        for key, (kind, *args) in cls.search_space.items():
            if kind == "choice":
                assert sample[key] in args[0]
            else:
                assert args[0] <= sample[key] <= args[1]
        cls.config_for("default", sample)  # raises ConfigError on an invalid draw
    first = next(iter(cls.search_space))
    if len(cls.search_space) > 1:
        assert first not in ray_search_space(cls, {first: 1})


def test_a_search_space_naming_no_hyperparameter_is_refused():
    class Broken(Backprop):
        search_space = {"learning_rate": ("loguniform", 1e-4, 1e-2)}

    with pytest.raises(ConfigError, match="'learning_rate', not a hyperparameter"):
        ray_search_space(Broken, {})


def test_two_trial_search_writes_a_preset_that_run_uses(tmp_path, monkeypatch, ray_cluster,
                                                       capsys):
    """Everything the search writes is under --out (the preset, Ray Tune's trials): the
    current directory stays empty, and `bpfree run --tuned-dir` reads the preset from there."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    tuned = tmp_path / "tuned"
    assert main(["tune", "backprop", "--dataset", "synthetic", "--trials", "2", "--epochs", "1",
                 "--set", "arch=mlp", "width=32", "--val-fraction", "0.2",
                 "--batch-size", "64", "--device", "cpu", "--out", str(tuned)]) == 0
    assert f"bpfree run --set preset=tuned --tuned-dir {tuned}" in capsys.readouterr().out
    assert list(cwd.iterdir()) == []
    saved = json.loads((tuned / "backprop__synthetic.json").read_text())
    assert (tuned / "trials" / "backprop__synthetic").is_dir()
    assert len(saved["trials"]) == 2 and saved["budget"]["trials"] == 2
    assert saved["budget"]["scheduler"].startswith("ASHA(") and "test" in saved["selection"]
    assert not any("test" in key for row in saved["trials"] for key in row)
    assert saved["val_acc"] == max(row["val_acc"] for row in saved["trials"])
    assert saved["config"]["arch"] == "mlp" and saved["config"]["lr"] == saved["tuned"]["lr"]

    out = tmp_path / "run"
    run = ["run", "--methods", "backprop", "--dataset", "synthetic", "--epochs", "1",
           "--seeds", "0", "--set", "preset=tuned", "--out", str(out), "--device", "cpu"]
    assert main(run) == 2  # not in ./results/tuned
    assert "bpfree tune backprop --dataset synthetic` first" in capsys.readouterr().err
    assert main([*run, "--tuned-dir", str(tuned)]) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert summary.loc[0, "preset"] == "tuned"
    assert json.loads(summary.loc[0, "config"]) == saved["config"]


def test_a_sweep_reads_tuned_presets_from_its_tuned_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tuned = tmp_path / "elsewhere"
    tuned.mkdir()
    (tuned / "backprop__synthetic.json").write_text(json.dumps(
        {"config": {"arch": "mlp", "width": 24, "lr": 0.004}}))
    path = tmp_path / "s.toml"
    text = ('methods = "backprop"\ndatasets = "synthetic"\nseeds = 0\nepochs = 1\n'
            'preset = "tuned"\n')
    path.write_text(text)
    with pytest.raises(ConfigError, match="no tuned preset for backprop on synthetic"):
        load_sweep(path)
    path.write_text(text + f'tuned_dir = "{tuned}"\n')
    (unit,) = load_sweep(path).units()
    assert dict(unit.overrides) == {"arch": "mlp", "width": 24, "lr": 0.004}


def test_tuned_preset_without_a_tuning_run_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--methods", "backprop", "--dataset", "synthetic",
                 "--set", "preset=tuned"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "run `bpfree tune backprop --dataset synthetic` first" in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "preset=quick"], "pick the starting preset with --preset"),
        (["--val-fraction", "0"], "--val-fraction must be in (0, 1)"),
        (["--set", "lrr=1"], "no selected method has a hyperparameter 'lrr'"),
        (["--trials", "0"], "--trials and --epochs must be >= 1"),
    ],
)
def test_tune_mistakes_are_one_line_before_ray_starts(args, message, capsys):
    assert main(["tune", "backprop", "--dataset", "synthetic", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
