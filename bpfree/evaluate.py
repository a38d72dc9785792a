"""`bpfree evaluate RUN_DIR`: evaluate saved models again, with other inference settings.

RUN_DIR is a run folder (`bpfree run --save-model`) or a sweep folder (`keep_model = true`).

A sampling method's accuracy depends on how its chain is run at test time (NoProp-DT's
ancestral or noise-free chain, NoProp-CT's and -FM's number of steps and solver). Training
decides none of that, so it is measured here on the models that were kept, without
retraining: each unit is rebuilt from its recorded configuration with the inference-time
overrides on top, its trained weights are loaded, and its validation accuracy (when the
folder carved a validation split) and test accuracy are measured over `inference_runs`
passes with the same seeding rule as the harness, so the unchanged settings reproduce the
recorded numbers. An inference setting is chosen on `val_acc`, never on `test_acc`.

Rows are added to `RUN_DIR/evaluations.csv` (one per unit and setting), so one call per
setting builds up an inference-steps table. Evaluating a unit again under the same setting and
number of runs replaces its row rather than adding a second: the passes are seeded, so the
accuracies are the same, and a table with the row twice would count it twice (a device run whose
first call was stopped at its time limit after writing, then repeated, left such pairs).
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
from torch import Tensor

from bpfree.checkpoints import load_state
from bpfree.data import Dataset, load_dataset
from bpfree.harness import build_method, evaluate, mean_and_se, resolve_device
from bpfree.methods import ConfigError, get_method
from bpfree.methods.base import make_config
from bpfree.records import (
    COMPLETE,
    RecordsError,
    latest_evaluations,
    read_json,
    read_unit,
    unit_dirs,
    write_csv,
)

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


def _saved_units(run_dir: Path, methods: list[str] | None, sweep: bool
                 ) -> list[dict[str, Any]]:
    """The summary rows of the units of `run_dir` (of `methods`) that can be evaluated: done
    (finished or diverged) and holding the model they ended with. The others are counted in
    one line on stderr, or, if no unit is left, in the one-line ConfigError."""
    saved: list[dict[str, Any]] = []
    unfinished = unkept = 0
    for unit_dir in unit_dirs(run_dir):
        if (unit_dir / "summary.json").is_file():
            row = read_unit(unit_dir)  # checked: a corrupt summary is one RecordsError
        else:
            try:
                row = read_json(unit_dir / "unit.json")
            except RecordsError:  # a unit that failed before writing it, or a stray folder
                row = {}
        if methods and row.get("method") not in methods:
            continue
        if row.get("status") not in COMPLETE:
            unfinished += 1
        elif not (unit_dir / "model.pt").is_file():
            unkept += 1
        else:
            saved.append({**row, "dir": unit_dir})
    keep = ("set keep_model = true in the sweep file" if sweep
            else "train with `bpfree run --save-model`")
    why = ", ".join(part for part in (
        f"{unfinished} unfinished (no model until a unit ends: run it to the end first)"
        if unfinished else "",
        f"{unkept} trained without keeping its model ({keep})" if unkept else "") if part)
    if not saved:
        which = f" of {','.join(methods)}" if methods else ""
        raise ConfigError(f"no unit{which} of {run_dir} can be evaluated: "
                          f"{why or 'it has no units'}; evaluate needs finished units that kept "
                          f"their model ({keep})")
    if why:
        print(f"bpfree: evaluating {len(saved)} unit(s); skipped {why}", file=sys.stderr)
    return saved


def evaluate_run(run_dir: Path, pairs: list[str], inference_runs: int, data_dir: str | None,
                 device_name: str = "auto", batch_size: int = 1000,
                 methods: list[str] | None = None) -> pd.DataFrame:
    """Evaluate every saved unit of `run_dir` (of `methods`, default all) under every
    setting; add the rows to evaluations.csv (see above).

    `run_dir` is a `bpfree run` folder or a `bpfree sweep` folder: each unit is evaluated on
    the dataset its own records name (a sweep may hold several), split with the folder's
    validation fraction, from `data_dir` or else the sweep file's data_dir. A run folder
    also records its data's fingerprint: other data is refused rather than scored.
    """
    if inference_runs < 1:
        raise ConfigError(f"--inference-runs must be >= 1, got {inference_runs}")
    meta_path = run_dir / "meta.json"
    if not meta_path.is_file():
        raise ConfigError(f"{run_dir} is not a bpfree run folder (no meta.json)")
    spec = read_json(meta_path).get("spec")
    if not isinstance(spec, dict):
        raise RecordsError(f"{meta_path}: corrupt, it has no spec")
    grid = settings_grid(pairs)
    for name in methods or []:
        get_method(name)
    sweep = "datasets" in spec  # a sweep's spec lists its datasets; a run's names one
    saved = _saved_units(run_dir, methods, sweep)
    device = resolve_device(device_name)
    if data_dir is None and sweep:
        data_dir = spec.get("data_dir")
    val_fraction = float(spec.get("val_fraction") or 0.0)
    loaded: dict[str, tuple[Dataset, Tensor, Tensor]] = {}
    rows: list[dict[str, Any]] = []
    for unit in saved:
        if unit["dataset"] not in loaded:
            data = load_dataset(unit["dataset"], data_dir, False, val_fraction)
            recorded = None if sweep else spec.get("data")
            if recorded is not None and data.fingerprint() != recorded:
                raise ConfigError(
                    f"{run_dir} was trained on other data than {unit['dataset']} from "
                    f"{data_dir or 'its default place'} (fingerprint {recorded}, now "
                    f"{data.fingerprint()}); pass the --data-dir it was trained with")
            val = (None if data.val_x is None
                   else (data.val_x.to(device), data.val_y.to(device)))
            loaded[unit["dataset"]] = (data, (data.test_x.to(device), data.test_y.to(device)),
                                       val)
        data, test, val = loaded[unit["dataset"]]
        model_path = unit["dir"] / "model.pt"
        cls = get_method(unit["method"])
        state = load_state(model_path, ("model",),
                           "that unit is then not evaluated; train it again into a new "
                           "--out DIR to keep its model")
        epochs = unit["epochs"]
        done: list[dict[str, str]] = []
        for setting in grid:
            applies = {k: v for k, v in setting.items() if k in cls.Config.__dataclass_fields__}
            if applies in done:  # a setting this method has no knob for: measured once
                continue
            done.append(applies)
            config = make_config(cls.Config, {**json.loads(unit["config"]), **applies}, cls.name)
            method, *_ = build_method(cls, config, data, unit["seed"], device)
            try:
                method.model.load_state_dict(state["model"])
            except (RuntimeError, TypeError, AttributeError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise RecordsError(f"{model_path} does not fit {unit['method']} as its "
                                   f"summary.json configures it ({first[:120]}); delete it or "
                                   f"train the unit again") from None
            start = time.perf_counter()
            seed = unit["seed"] * 1_000 + epochs
            accs = evaluate(method, *test, batch_size, inference_runs, seed)
            mean, se = mean_and_se(accs)
            val_mean, val_se = (mean_and_se(evaluate(method, *val, batch_size, inference_runs,
                                                     seed))
                                if val is not None else (float("nan"), float("nan")))
            rows.append({"unit": unit["unit"], "method": unit["method"],
                         "dataset": unit["dataset"], "seed": unit["seed"],
                         "epochs": epochs, "setting": json.dumps(applies, sort_keys=True),
                         **applies, "val_acc": val_mean, "val_acc_se": val_se,
                         "test_acc": mean, "test_acc_se": se,
                         "inference_runs": len(accs),
                         "eval_time_s": time.perf_counter() - start})
    frame = pd.DataFrame(rows)
    out = run_dir / "evaluations.csv"
    if out.is_file():
        frame = latest_evaluations(pd.concat([pd.read_csv(out), frame], ignore_index=True))
    write_csv(out, frame)
    return frame.tail(len(rows))
