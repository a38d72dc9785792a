"""`bpfree evaluate RUN_DIR`: evaluate saved models again, with other inference settings.

A sampling method's accuracy depends on how its chain is run at test time (NoProp-DT's
ancestral or noise-free chain, NoProp-CT's and -FM's number of steps and solver). Training
decides none of that, so it is measured here on the models that `bpfree run --save-model`
kept, without retraining: each unit is rebuilt from its recorded configuration with the
inference-time overrides on top, its trained weights are loaded, and its test accuracy is
measured over `inference_runs` passes with the same seeding rule as the harness, so the
unchanged settings reproduce the recorded number.

Rows are appended to `RUN_DIR/evaluations.csv` (one per unit and setting), so one call per
setting builds up an inference-steps table.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import pandas as pd

from bpfree.checkpoints import load_state
from bpfree.data import load_dataset
from bpfree.harness import build_method, evaluate, mean_and_se, resolve_device
from bpfree.methods import ConfigError, get_method
from bpfree.methods.base import make_config
from bpfree.records import read_json, unit_dirs, write_csv

# Settings that change inference only: anything else would not match the trained weights.
INFERENCE_KEYS = ("inference_steps", "sampler", "step")


def settings_grid(pairs: list[str]) -> list[dict[str, str]]:
    """`key=v1,v2` pairs -> every combination, e.g. inference_steps=10,100 sampler=euler,heun."""
    axes: dict[str, list[str]] = {}
    for pair in pairs:
        key, sep, values = pair.partition("=")
        if not sep or not values:
            raise ConfigError(f"--set {pair!r} is not key=value[,value...]")
        if key not in INFERENCE_KEYS:
            raise ConfigError(f"--set {key}: only inference settings can change after training "
                              f"({', '.join(INFERENCE_KEYS)})")
        axes[key] = values.split(",")
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())] or [{}]


def evaluate_run(run_dir: Path, pairs: list[str], inference_runs: int, data_dir: str | None,
                 device_name: str = "auto", batch_size: int = 1000,
                 methods: list[str] | None = None) -> pd.DataFrame:
    """Evaluate every saved unit of `run_dir` (of `methods`, default all) under every
    setting; append the rows to evaluations.csv."""
    if inference_runs < 1:
        raise ConfigError(f"--inference-runs must be >= 1, got {inference_runs}")
    meta_path = run_dir / "meta.json"
    if not meta_path.is_file():
        raise ConfigError(f"{run_dir} is not a bpfree run folder (no meta.json)")
    spec = read_json(meta_path).get("spec", {})
    grid = settings_grid(pairs)
    for name in methods or []:
        get_method(name)
    saved = [u for u in unit_dirs(run_dir) if (u / "model.pt").is_file()
             and (not methods or read_json(u / "unit.json").get("method") in methods)]
    if not saved:
        raise ConfigError(f"no unit of {run_dir}{' of ' + ','.join(methods) if methods else ''} "
                          f"kept its model; train with `bpfree run --save-model`")
    device = resolve_device(device_name)
    data = load_dataset(spec["dataset"], data_dir, False, spec.get("val_fraction", 0.0))
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    rows: list[dict[str, Any]] = []
    for unit_dir in saved:
        unit = read_json(unit_dir / "unit.json")
        cls = get_method(unit["method"])
        state = load_state(unit_dir / "model.pt", ("model",),
                           "that unit is then not evaluated; `bpfree run --save-model` into a "
                           "new --out DIR saves it again")
        epochs = unit["epochs"]
        done: list[dict[str, str]] = []
        for setting in grid:
            applies = {k: v for k, v in setting.items() if k in cls.Config.__dataclass_fields__}
            if applies in done:  # a setting this method has no knob for: measured once
                continue
            done.append(applies)
            config = make_config(cls.Config, {**json.loads(unit["config"]), **applies}, cls.name)
            method, *_ = build_method(cls, config, data, unit["seed"], device)
            method.model.load_state_dict(state["model"])
            start = time.perf_counter()
            accs = evaluate(method, test_x, test_y, batch_size, inference_runs,
                            unit["seed"] * 1_000 + epochs)
            mean, se = mean_and_se(accs)
            rows.append({"unit": unit["unit"], "method": unit["method"], "seed": unit["seed"],
                         "epochs": epochs, "setting": json.dumps(applies, sort_keys=True),
                         **applies, "test_acc": mean, "test_acc_se": se,
                         "inference_runs": len(accs),
                         "eval_time_s": time.perf_counter() - start})
    frame = pd.DataFrame(rows)
    out = run_dir / "evaluations.csv"
    if out.is_file():
        frame = pd.concat([pd.read_csv(out), frame], ignore_index=True)
    write_csv(out, frame)
    return frame.tail(len(rows))
