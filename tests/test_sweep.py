"""`bpfree sweep`: sweep files, the local and Ray executors, retries of killed units, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
from bpfree.methods import ConfigError

from bpfree.cli import main
from bpfree.records import DRIVER_LOCK_NAME, RecordsError, exclusive
from bpfree.sweep import load_sweep, run_sweep
from tests.conftest import FAKE_GPU

SWEEPS = Path(__file__).resolve().parents[1] / "bpfree" / "sweeps"
TINY = {"methods": "backprop", "datasets": "synthetic", "seeds": [0, 1], "epochs": 1,
        "cpus_per_unit": 1,
        "grid": {"backprop": {"arch": "mlp", "width": 32}}}
SAME = ["unit", "epoch", "train_acc", "test_acc", "train_loss"]  # everything but times


def write_sweep(path: Path, spec: dict) -> Path:
    """A sweep file from a dict (JSON values are valid TOML values for these types)."""
    lines = [f"{k} = {json.dumps(v)}" for k, v in spec.items() if k != "grid"]
    for method, table in spec.get("grid", {}).items():
        lines += [f"[grid.{method}]", *(f"{k} = {json.dumps(v)}" for k, v in table.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def attempts(sweep_dir: Path) -> dict[str, list[dict]]:
    return {d.name: json.loads((d / "attempts.json").read_text())
            for d in sorted((sweep_dir / "units").iterdir())}


def test_ray_sweep_gives_the_local_records_and_resume_skips_done_units(tmp_path, ray_cluster):
    assert {n["NodeManagerAddress"] for n in ray_cluster.nodes()} == {"127.0.0.1"}  # loopback only
    sweep = load_sweep(write_sweep(tmp_path / "tiny.toml", TINY))
    local = run_sweep(sweep, tmp_path / "local", "local", max_parallel=2)
    on_ray = run_sweep(sweep, tmp_path / "ray", "ray")
    assert (local.total, local.finished, local.failed) == (2, 2, 0)
    assert (on_ray.total, on_ray.finished, on_ray.failed) == (2, 2, 0)
    a, b = (pd.read_csv(tmp_path / d / "records.csv").sort_values("unit") for d in ("local", "ray"))
    pd.testing.assert_frame_equal(a[SAME].reset_index(drop=True), b[SAME].reset_index(drop=True))
    assert (a["test_acc"] > 0.5).all()
    history = attempts(tmp_path / "ray")
    assert {h[0]["executor"] for h in history.values()} == {"ray"}
    assert all(h[0]["torch_threads"] == 1 for h in history.values())

    again = run_sweep(sweep, tmp_path / "local", "local")
    assert (again.skipped, again.finished, again.failed) == (2, 0, 0)
    assert all(len(h) == 1 for h in attempts(tmp_path / "local").values())
    assert main(["report", str(tmp_path / "ray")]) == 0


def intervals(sweep_dir: Path) -> list[tuple[datetime, datetime]]:
    """(start, end) of every unit's first attempt."""
    spans = []
    for history in attempts(sweep_dir).values():
        first = history[0]
        spans.append((datetime.fromisoformat(first["started"]),
                      datetime.fromisoformat(first["finished"])))
    return spans


def overlapping(spans: list[tuple[datetime, datetime]]) -> bool:
    spans = sorted(spans)
    return any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))


@pytest.mark.parametrize("units_per_gpu", [1, 2])
def test_ray_places_units_per_gpu_share(tmp_path, ray_cluster, units_per_gpu):
    """Each unit asks Ray for 1/units_per_gpu of the cluster's one (stand-in) GPU: two
    units share it at once, one unit per GPU runs them one after the other."""
    spec = {**TINY, "units_per_gpu": units_per_gpu, "epochs": 3}
    sweep = load_sweep(write_sweep(tmp_path / "gpu.toml", spec))
    result = run_sweep(sweep, tmp_path / "out", "ray", gpu_resource=FAKE_GPU)
    assert (result.finished, result.failed) == (2, 0)
    history = attempts(tmp_path / "out")
    assert [h[0]["gpu_share"] for h in history.values()] == [1 / units_per_gpu] * 2
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["max_parallel"] == units_per_gpu
    assert overlapping(intervals(tmp_path / "out")) == (units_per_gpu == 2)


def kill_after_first_epoch(unit_dir: Path, killed: list[int]) -> None:
    """SIGKILL the process running the unit once it has finished an epoch (mid-run)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        records, worker = unit_dir / "records.csv", unit_dir / "worker.json"
        if records.is_file() and worker.is_file() and len(records.read_text().splitlines()) > 1:
            pid = json.loads(worker.read_text())["pid"]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.005)


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_killed_unit_is_retried_and_resumes_from_its_checkpoint(tmp_path, executor, request):
    if executor == "ray":
        request.getfixturevalue("ray_cluster")
    epochs = 8
    spec = {**TINY, "seeds": 0, "epochs": epochs, "batch_size": 8, "max_retries": 1}
    sweep = load_sweep(write_sweep(tmp_path / "kill.toml", spec))
    (unit,) = sweep.units()
    killed: list[int] = []
    killer = threading.Thread(target=kill_after_first_epoch,
                              args=(tmp_path / "out" / "units" / unit.id, killed))
    killer.start()
    result = run_sweep(sweep, tmp_path / "out", executor)
    killer.join()
    assert killed, "the unit finished before it could be killed"
    assert (result.finished, result.failed) == (1, 0)
    first, second = attempts(tmp_path / "out")[unit.id]
    assert first["status"] == "failed" and first["pid"] == killed[0]
    assert "SIGKILL" in first["error"] or "WorkerCrashedError" in first["error"], first["error"]
    assert second["status"] == "finished" and second["pid"] != killed[0]
    records = pd.read_csv(tmp_path / "out" / "records.csv")
    assert records["epoch"].tolist() == list(range(1, epochs + 1))  # resumed, nothing redone
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert summary["status"].tolist() == ["finished"]


def test_a_failing_unit_is_recorded_and_the_rest_go_on(tmp_path, capsys):
    """A user mistake inside a unit (here: missing files) is not retried: it would fail again."""
    spec = {**TINY, "datasets": ["synthetic", "mnist"], "seeds": 0, "max_retries": 3,
            "data_dir": str(tmp_path)}
    path = write_sweep(tmp_path / "mixed.toml", spec)
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 1
    summary = pd.read_csv(tmp_path / "out" / "summary.csv").set_index("dataset")
    assert summary.loc["synthetic", "status"] == "finished"
    assert summary.loc["mnist", "status"] == "failed"
    assert "DataError" in summary.loc["mnist", "error"]
    assert [len(h) for h in attempts(tmp_path / "out").values()] == [1, 1]
    assert "1 failed" in capsys.readouterr().err


def test_a_batch_larger_than_the_training_set_fails_the_unit_before_it_trains(tmp_path):
    """`bpfree run` refuses it up front; in a sweep each worker loads its own data, so the
    harness checks every unit: one ConfigError line, not retried, and nothing trained (it
    used to train one short batch per epoch, a different budget, without a word)."""
    spec = {**TINY, "seeds": 0, "batch_size": 5000, "max_retries": 3}
    out = tmp_path / "out"
    assert main(["sweep", str(write_sweep(tmp_path / "big.toml", spec)), "--out", str(out)]) == 1
    row = pd.read_csv(out / "summary.csv").iloc[0]
    assert row["status"] == "failed"
    assert "batch size 5000 is larger than the 1024 training images of synthetic" in row["error"]
    assert [len(h) for h in attempts(out).values()] == [1]
    assert not list((out / "units").glob("*/records.csv"))


def test_changing_the_shared_budget_of_a_sweep_folder_is_refused(tmp_path):
    sweep_dir = tmp_path / "out"
    run_sweep(load_sweep(write_sweep(tmp_path / "a.toml", {**TINY, "seeds": 0})), sweep_dir)
    grown = load_sweep(write_sweep(tmp_path / "b.toml", {**TINY, "seeds": 0, "batch_size": 64}))
    with pytest.raises(RecordsError, match="batch_size=128"):
        run_sweep(grown, sweep_dir)


@pytest.mark.parametrize(
    "text,message",
    [
        ("methods = [", "not valid TOML"),
        ('methods = "backprop"\ndatasets = "synthetic"\nseeds = 0\nepochs = 1\nepoch = 2',
         "unknown key 'epoch'"),
        ('methods = "backprop"\ndatasets = "synthetic"\nepochs = 1', "missing key 'seeds'"),
        ('methods = "backprop"\ndatasets = "synthetic"\nseeds = ["a"]\nepochs = 1',
         "key 'seeds' must be an integer"),
        ('methods = "backprop"\ndatasets = "synthetic"\nseeds = 0\nepochs = 0',
         "key 'epochs': epochs must be >= 1"),
        ('methods = "nope"\ndatasets = "synthetic"\nseeds = 0\nepochs = 1',
         "key 'methods': unknown method 'nope'"),
        ('methods = "backprop"\ndatasets = "imagenet"\nseeds = 0\nepochs = 1',
         "key 'datasets': unknown dataset 'imagenet'"),
        ('methods = "backprop"\ndatasets = "synthetic"\nseeds = 0\nepochs = 1\ndevice = "tpu"',
         "key 'device': device must be one of"),
        ('methods = "backprop"\ndatasets = "synthetic"\nseeds = 0\nepochs = 1\n'
         '[grid.fg-w]\nlr = [0.1]', "[grid.fg-w]: 'fg-w' is not in 'methods'"),
        ('methods = "backprop"\ndatasets = "synthetic"\nseeds = 0\nepochs = 1\n'
         '[grid.backprop]\nlrr = [0.1]', "[grid.backprop] unknown hyperparameter 'lrr'"),
        ('methods = "backprop"\ndatasets = "synthetic"\nseeds = 0\nepochs = 1\n'
         '[grid.backprop]\nwidth = [1.5]', "[grid.backprop] width='1.5' is not a valid int"),
        ('methods = "backprop"\ndatasets = "synthetic"\nseeds = 0\nepochs = 1\n'
         '[grid.backprop]\nlr = []', "key 'grid.backprop.lr' must be"),
    ],
)
def test_sweep_file_mistakes_are_one_line_naming_file_and_key(text, message, tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    assert message in str(info.value) and str(path) in str(info.value)
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("bpfree: error:")


def test_shipped_sweeps_are_valid():
    paths = sorted(SWEEPS.glob("*.toml"))
    assert len(paths) >= 2
    for path in paths:
        sweep = load_sweep(path)
        assert sweep.description and sweep.units()


def test_arrays_of_grid_tables_are_a_union_of_cross_products(tmp_path):
    """[[grid.M]] tables list conditions (a one-factor-at-a-time ablation); each table is
    still a cross product of its own axes."""
    path = tmp_path / "ablation.toml"
    path.write_text('methods = "backprop"\ndatasets = "synthetic"\nseeds = 0\nepochs = 1\n'
                    '[[grid.backprop]]\narch = "cnn"\n'
                    '[[grid.backprop]]\narch = "mlp"\nwidth = [16, 32]\n')
    units = load_sweep(path).units()
    assert sorted(dict(u.overrides).get("width", "-") + dict(u.overrides)["arch"] for u in units) \
        == ["-cnn", "16mlp", "32mlp"]


def dead(pid: int) -> bool:
    """Gone, or a zombie waiting for a parent that will reap it (it runs nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_workers_die_with_a_killed_driver_and_the_rerun_resumes(tmp_path):
    """SIGKILL the driver of a local sweep mid-run: its workers stop within seconds (none
    trains on, unseen), and running the sweep again resumes both units from their
    checkpoints, with the killed attempts kept in attempts.json as interrupted."""
    epochs = 30
    spec = {**TINY, "epochs": epochs, "batch_size": 8}
    path = write_sweep(tmp_path / "kill.toml", spec)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "bpfree.cli", "sweep", str(path), "--out", str(out),
            "--max-parallel", "2"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    driver = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    units = [u.id for u in load_sweep(path).units()]
    deadline = time.monotonic() + 300
    pids: dict[str, int] = {}
    while time.monotonic() < deadline and driver.poll() is None:
        for uid in units:
            worker, records = out / "units" / uid / "worker.json", out / "units" / uid / "records.csv"
            if worker.is_file() and records.is_file():
                pids[uid] = json.loads(worker.read_text())["pid"]
        if len(pids) == len(units):
            break
        time.sleep(0.05)
    assert len(pids) == len(units), driver.stderr.read() if driver.poll() is not None else pids
    driver.kill()
    driver.wait()
    deadline = time.monotonic() + 60  # a liveness bound, not a timing measurement
    while time.monotonic() < deadline and not all(dead(pid) for pid in pids.values()):
        time.sleep(0.1)
    assert all(dead(pid) for pid in pids.values()), "workers outlived their driver"
    finished = [uid for uid in units if (out / "units" / uid / "summary.json").exists()]
    assert not finished, f"orphaned workers trained on and finished {finished}"

    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "2 attempt(s) of a previous driver were interrupted" in again.stderr
    history = attempts(out)
    for uid in units:
        first, second = history[uid]
        assert first["status"] == "interrupted" and first["pid"] == pids[uid]
        assert second["status"] == "finished" and second["attempt"] == 2
    records = pd.read_csv(out / "records.csv")
    for uid in units:  # resumed: every epoch once
        assert records[records["unit"] == uid]["epoch"].tolist() == list(range(1, epochs + 1))


def test_a_second_driver_on_one_sweep_folder_is_refused(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path / "tiny.toml", {**TINY, "seeds": 0}))
    with exclusive(tmp_path / "out" / DRIVER_LOCK_NAME):
        with pytest.raises(RecordsError, match="another bpfree sweep .* is running in"):
            run_sweep(sweep, tmp_path / "out")
    assert not (tmp_path / "out" / "meta.json").exists()


def test_evaluate_reads_a_sweep_folder_and_says_what_it_cannot_evaluate(tmp_path, capsys):
    """A sweep folder's meta.json lists datasets, not one dataset (evaluate used to die with
    KeyError 'dataset'): each unit is evaluated on its own dataset, split with the sweep's
    val_fraction, and reproduces its recorded accuracy; a unit without a model is one line."""
    spec = {"methods": ["noprop-dt", "backprop"], "datasets": "synthetic", "seeds": 0,
            "epochs": 1, "preset": "quick", "cpus_per_unit": 1, "keep_model": True,
            "val_fraction": 0.1, "device": "cpu",
            "grid": {"backprop": {"arch": "mlp"}}}
    out = tmp_path / "out"
    assert main(["sweep", str(write_sweep(tmp_path / "keep.toml", spec)), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--methods", "noprop-dt", "--inference-runs", "1",
                 "--device", "cpu", "--set", "sampler=ancestral,mean"]) == 0
    rows = pd.read_csv(out / "evaluations.csv").set_index("sampler")
    assert sorted(rows.index) == ["ancestral", "mean"] and set(rows["dataset"]) == {"synthetic"}
    recorded = pd.read_csv(out / "summary.csv").set_index("method")
    assert rows.loc["ancestral", "test_acc"] == pytest.approx(
        recorded.loc["noprop-dt", "final_test_acc"], abs=1e-12)
    # the validation split is scored too, so an inference setting is chosen without test
    assert rows.loc["ancestral", "val_acc"] == pytest.approx(
        recorded.loc["noprop-dt", "final_val_acc"], abs=1e-12)
    assert rows["val_acc"].notna().all()

    backprop = next((out / "units").glob("backprop*"))
    (backprop / "summary.json").unlink()  # as if killed before its end: no model kept yet
    (backprop / "model.pt").unlink()
    assert main(["evaluate", str(out), "--methods", "backprop", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 unfinished" in err and "Traceback" not in err
    assert main(["evaluate", str(out), "--inference-runs", "1", "--device", "cpu"]) == 0
    assert "skipped 1 unfinished" in capsys.readouterr().err
