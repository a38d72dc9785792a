"""`bpfree tune METHOD --dataset D`: equal-budget hyperparameter search with Ray Tune.

A comparison is only fair if every method gets the same tuning effort, so the budget is not
per method: every search runs the same number of random trials (`--trials`), each for the
same epochs, under the same ASHA scheduler, over the method's own declared `search_space`
(methods/base.py). Trials are scored on a validation split carved from the training set;
the test split is dropped in `tuning_split`, before any trial sees the data, so no trial
can evaluate it, let alone select on it.

The chosen configuration is written to `<out>/<method>__<dataset>.json` (`--out`, default
`results/tuned`), and Ray Tune's trial folders to `<out>/trials/`: everything a search writes
is under the one folder it was given. `bpfree run --set preset=tuned` (and `preset = "tuned"`
in a sweep) read it back through `resolve_preset`, from results/tuned or from `--tuned-dir`
(`tuned_dir` in a sweep file). This module imports Ray only inside `tune_method`, so
resolving a tuned preset needs no Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torch import Tensor

from bpfree.data import load_dataset
from bpfree.harness import batches, build_method, diverged, evaluate, resolve_device, train_epoch
from bpfree.methods import ConfigError, get_method
from bpfree.methods.base import TUNED_PRESET
from bpfree.records import read_json, write_json

TUNED_DIR = Path("results/tuned")
TRIALS = "trials"  # Ray Tune's own trial folders, inside the tuned-preset folder
REDUCTION_FACTOR = 3  # ASHA keeps the best third of trials at each rung


def tuned_path(method: str, dataset: str, tuned_dir: Path = TUNED_DIR) -> Path:
    return tuned_dir / f"{method}__{dataset}.json"


def resolve_preset(method: str, dataset: str, preset: str, overrides: dict[str, Any],
                   tuned_dir: Path = TUNED_DIR) -> dict[str, Any]:
    """The overrides a unit gets: for the tuned preset, the tuned configuration in
    `tuned_dir` with the user's overrides on top (see `methods.base.TUNED_PRESET`);
    otherwise `overrides`."""
    if preset != TUNED_PRESET:
        return dict(overrides)
    path = tuned_path(method, dataset, tuned_dir)
    if not path.is_file():
        out = "" if tuned_dir == TUNED_DIR else f" --out {tuned_dir}"
        raise ConfigError(f"no tuned preset for {method} on {dataset} ({path} is missing); "
                          f"run `bpfree tune {method} --dataset {dataset}{out}` first")
    config = read_json(path).get("config")
    if not isinstance(config, dict):
        raise ConfigError(f"{path} holds no tuned config; run `bpfree tune {method} "
                          f"--dataset {dataset}` again")
    return {**config, **overrides}


@dataclass(frozen=True)
class TrainVal:
    """A dataset without its test split: all that a tuning trial may see."""

    name: str
    num_classes: int
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


def tuning_split(name: str, data_dir: str | None, val_fraction: float) -> TrainVal:
    """Train and validation (carved from train, stratified, seed 0); the test split is
    dropped here, untouched."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in (0, 1) for tuning, got {val_fraction}")
    data = load_dataset(name, data_dir, False, val_fraction)
    return TrainVal(data.name, data.num_classes, data.train_x, data.train_y,
                    data.val_x, data.val_y)


def trial(config: dict[str, Any], *, method: str, dataset: str, preset: str,
          fixed: dict[str, Any], epochs: int, batch_size: int, device: str, seed: int,
          data_dir: str | None, val_fraction: float,
          report: Callable[[dict[str, Any]], None]) -> None:
    """One trial: train `method` with `config` over `fixed` over `preset`, and report the
    validation accuracy after every epoch (ASHA stops weak trials on it)."""
    data = tuning_split(dataset, data_dir, val_fraction)
    cls = get_method(method)
    dev = resolve_device(device)
    config = cls.config_for(preset, {**fixed, **config})
    model, (train_x, train_y), _, _ = build_method(cls, config, data, seed, dev, batch_size)
    val_x, val_y = data.val_x.to(dev), data.val_y.to(dev)
    first_loss = None
    for epoch in range(1, epochs + 1):
        order = batches(len(train_x), batch_size, seed, epoch, dev)
        means, _, first = train_epoch(model, train_x, train_y, order)
        first_loss = first if first_loss is None else first_loss
        blew_up = diverged(means, first_loss)
        val_acc = 0.0 if blew_up else evaluate(model, val_x, val_y, 1000, 1, seed * 1_000 + epoch)[0]
        report({"val_acc": val_acc, "epoch": epoch, "diverged": blew_up})
        if blew_up:
            return


def ray_search_space(cls: Any, fixed: dict[str, Any]) -> dict[str, Any]:
    """The method's declared search space as Ray Tune distributions, minus fixed keys."""
    from ray import tune

    kinds = {"loguniform": tune.loguniform, "uniform": tune.uniform,
             "randint": tune.randint, "choice": tune.choice}
    space = {}
    for key, (kind, *args) in cls.search_space.items():
        if key not in cls.Config.__dataclass_fields__:
            raise ConfigError(f"{cls.name}.search_space names {key!r}, not a hyperparameter")
        if kind not in kinds:
            raise ConfigError(f"{cls.name}.search_space[{key!r}]: unknown kind {kind!r}; "
                              f"known: {', '.join(kinds)}")
        if key not in fixed:
            space[key] = kinds[kind](*args)
    if not space:
        raise ConfigError(f"nothing to tune for {cls.name}: every key of its search space "
                          f"({', '.join(cls.search_space)}) is fixed by --set")
    return space


def _ray_trial(config: dict[str, Any], **kwargs: Any) -> None:
    from ray import tune

    trial(config, report=tune.report, **kwargs)


def tune_method(method: str, dataset: str, trials: int, epochs: int, preset: str = "default",
                fixed: dict[str, Any] | None = None, val_fraction: float = 0.1,
                batch_size: int = 128, device: str = "cpu", seed: int = 0,
                data_dir: str | None = None, address: str | None = None,
                cpus_per_trial: int = 1, out_dir: Path = TUNED_DIR
                ) -> tuple[Path, dict[str, Any]]:
    """Run the equal-budget search and write the chosen preset; returns (path, its content).
    Everything it writes goes under `out_dir`: the preset, and Ray Tune's trials in
    `out_dir/trials/`."""
    from bpfree.version import git_commit
    from bpfree.workers import start_ray

    fixed = dict(fixed or {})
    cls = get_method(method)
    cls.config_for(preset, fixed)  # a bad preset or --set fails here, not in every trial
    if trials < 1 or epochs < 1:
        raise ConfigError("--trials and --epochs must be >= 1")
    tuning_split(dataset, data_dir, val_fraction)  # a bad dataset or path fails here, once
    storage = out_dir / TRIALS
    try:
        storage.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot write to {out_dir} ({exc.strerror}); pass a writable "
                          f"--out DIR") from None
    owns_ray = start_ray(address)
    try:
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler
        from ray.tune.search.basic_variant import BasicVariantGenerator

        space = ray_search_space(cls, fixed)
        gpu = 1 if resolve_device(device).type == "cuda" else 0
        scheduler = ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=1,
                                  reduction_factor=REDUCTION_FACTOR)
        trainable = tune.with_parameters(
            _ray_trial, method=method, dataset=dataset, preset=preset, fixed=fixed,
            epochs=epochs, batch_size=batch_size, device="cuda" if gpu else "cpu", seed=seed,
            data_dir=str(Path(data_dir).resolve()) if data_dir else None,
            val_fraction=val_fraction)
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": cpus_per_trial, "gpu": gpu}),
            param_space=space,
            tune_config=tune.TuneConfig(metric="val_acc", mode="max", num_samples=trials,
                                        scheduler=scheduler,
                                        search_alg=BasicVariantGenerator(random_state=seed)),
            run_config=tune.RunConfig(name=f"{method}__{dataset}",
                                      storage_path=str(storage.resolve()), verbose=0),
        )
        results = tuner.fit()
    finally:
        if owns_ray:
            import ray

            ray.shutdown()
    table = [{"config": r.config, "val_acc": r.metrics.get("val_acc"),
              "epochs_done": r.metrics.get("epoch"), "error": str(r.error) if r.error else None}
             for r in results]
    scored = [row for row in table if row["val_acc"] is not None and row["error"] is None]
    if not scored:
        raise RuntimeError(f"every tuning trial of {method} failed: {table[0]['error']}")
    # Last reported value, as ASHA ranks them; ties go to the earlier trial (stable max).
    best = max(scored, key=lambda row: row["val_acc"])
    chosen = cls.config_for(preset, {**fixed, **best["config"]})
    content = {
        "method": method, "dataset": dataset, "base_preset": preset, "fixed": fixed,
        "tuned": best["config"], "config": asdict(chosen), "val_acc": best["val_acc"],
        "selection": f"last-epoch val_acc on a stratified {val_fraction} split of train "
                     f"(seed 0); the test split is never loaded into a trial",
        "budget": {"trials": trials, "epochs": epochs, "batch_size": batch_size,
                   "search": f"random (BasicVariantGenerator, seed {seed})",
                   "scheduler": f"ASHA(time_attr=epoch, max_t={epochs}, grace_period=1, "
                                f"reduction_factor={REDUCTION_FACTOR})",
                   "cpus_per_trial": cpus_per_trial, "device": "cuda" if gpu else "cpu"},
        "search_space": {k: list(v) for k, v in cls.search_space.items() if k in space},
        "trials": table, "seed": seed, "git_commit": git_commit(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = tuned_path(method, dataset, out_dir)
    write_json(path, content)
    return path, content
