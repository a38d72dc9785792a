"""The device checks of a GPU session, as one script with a time budget.

Run from the repository root on a machine with one CUDA GPU and the canonical MNIST files:

    python3 benchmarks/gpu/device_checks.py --data-dir DIR --out OUT [--budget-s 560]

Phases, each in its own process and bounded by what is left of the budget:

1. `cuda-tests`: the CUDA tests of tests/test_step_modes.py (a recorded graph's steps equal
   eager steps, per capturable method). A method that fails runs eagerly from then on.
2. `cost`: `bpfree cost` of the NoProp methods and backprop (CNN), paper presets, batch 128
   and 1024, eager against graph, with the harness-overhead comparison for the graph step at
   batch 128, and NoProp-DT's stacked blocks. Rows are saved as each method finishes.
3. `alone`: two epochs of NoProp-DT and of backprop-blocks, one unit at a time on the GPU
   (time per epoch alone, for the units-per-hour comparison).
4. `sweep`: bpfree/sweeps/noprop-dt-ablation.toml, every unit at once on the one GPU, with
   whatever time is left but for the last phases.
5. `evaluate` / `report`: NoProp-DT's kept models under both samplers, the report, then
   CT and FM under other step counts and solvers.

`--plan protocol` runs a second, shorter set (the work the first session's checks left):

1. `cuda-tests`, as above.
2. `alone`: 10 epochs of full MNIST for NoProp-DT and backprop-blocks with the fast step, seed
   0, one unit at a time (time per epoch with the GPU to itself), 5 inference runs per epoch.
3. `ff-paper`: Forward-Forward's `paper` preset for its 60 epochs, started in the background
   once `alone` is done (an eager, host-bound MLP; it shares the GPU with phase 4).
4. `seeds`: the same two units for seeds 1 and 2, so that NoProp-DT has the paper's protocol
   (3 seeds x 5 inference runs) next to its backprop twin on the same network and split.
5. `evaluate` (NoProp-DT's kept models under the ancestral and mean chains, 5 runs) and
   `report` of the three folders. Whatever `ff-paper` has not finished by then is stopped; its
   records so far come back.

bpfree need not be installed there (the device image has torch but cannot fetch
setuptools-scm to build it): if `bpfree.methods` does not import, the script links methods/,
reports/ and results/ into bpfree/ (untracked symbolic links, so the commit stays clean) and
runs everything with the repository root on PYTHONPATH, so provenance still reads this clone.

Everything written goes under OUT/work (or --work-dir), and OUT/results.tar.gz is refreshed after every phase,
so that a run stopped at its time limit still returns what it measured. A log of every phase
(command, seconds, exit code, output tail) is OUT/work/phases.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[2]
CAPTURABLE = ["backprop", "backprop-blocks", "noprop-dt", "noprop-ct", "noprop-fm", "fg-w",
              "fg-a", "lg-fg-a"]
COST_METHODS = ["noprop-dt", "backprop-blocks", "noprop-ct", "noprop-fm", "backprop"]
SWEEP = REPO / "bpfree" / "sweeps" / "noprop-dt-ablation.toml"


class Phases:
    def __init__(self, out: Path, budget_s: float, work: Path | None = None) -> None:
        self.out, self.work = out, work or out / "work"
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + budget_s
        self.log: list[dict] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, cmd: list[str], limit_s: float, env: dict | None = None) -> int:
        """Run a phase to its end or to `limit_s` (and what is left of the budget)."""
        limit = min(limit_s, self.left() - 15)
        if limit < 10:
            self.log.append({"phase": name, "skipped": "no time left"})
            self.save()
            return -1
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd)} (limit {limit:.0f}s)",
              flush=True)
        return self.finish(self.start(name, cmd, env), limit)

    def start(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        """Start a phase; `finish` waits for it. A phase started on its own runs in the
        background beside the next ones."""
        sink = open(self.work / f"{name}.log", "w")
        # A session of its own, so that a timeout ends the command's workers too.
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        proc.bpfree_phase = (name, cmd, time.monotonic(), sink)  # type: ignore[attr-defined]
        return proc

    def finish(self, proc: subprocess.Popen, limit_s: float) -> int:
        """Wait up to `limit_s` for a started phase, stop it after that (exit code 124), and
        log and save what it wrote."""
        name, cmd, start, sink = proc.bpfree_phase  # type: ignore[attr-defined]
        try:
            code = proc.wait(timeout=max(1.0, limit_s))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            code = 124
        sink.close()
        seconds = time.monotonic() - start
        output = (self.work / f"{name}.log").read_text(errors="replace")
        self.log.append({"phase": name, "cmd": cmd, "seconds": round(seconds, 1), "code": code,
                         "tail": output[-1500:]})
        print(f"    {name} -> exit {code} in {seconds:.0f}s", flush=True)
        self.save()
        return code

    def save(self) -> None:
        (self.work / "phases.json").write_text(json.dumps(self.log, indent=1))
        tmp = self.out / ".results.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(self.work, arcname="work",
                    filter=lambda info: None if info.name.endswith((".pt", ".tmp")) else info)
        tmp.replace(self.out / "results.tar.gz")


def ensure_importable() -> None:
    """Make `bpfree` importable from this clone without installing it (see above)."""
    probe = [sys.executable, "-c", "import bpfree.methods, bpfree.reports, bpfree.results"]
    if subprocess.run(probe, cwd=REPO, capture_output=True).returncode == 0:
        return
    for folder in ("methods", "reports", "results"):
        link = REPO / "bpfree" / folder
        if not link.exists():
            link.symlink_to(Path("..") / folder)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    subprocess.run(probe, cwd=REPO, check=True)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "bpfree.cli", *args]


def graph_failures(log: str) -> set[str]:
    """Methods whose CUDA graph test did not pass, from pytest's -rA summary lines."""
    test = "tests/test_step_modes.py::test_graph_steps_equal_eager_steps_on_cuda"
    return {m for m in CAPTURABLE if f"PASSED {test}[{m}]" not in log}


def toml_value(value: object) -> str:
    return json.dumps(value)


def sweep_file(path: Path, eager: set[str]) -> Path:
    """The ablation sweep, with `step = "eager"` added for methods whose graph failed."""
    raw = tomllib.loads(SWEEP.read_text())
    grid = raw.pop("grid", {})
    lines = [f"{k} = {toml_value(v)}" for k, v in raw.items()]
    for method in raw["methods"]:
        tables = grid.get(method, [{}])
        for table in tables if isinstance(tables, list) else [tables]:
            lines.append(f"[[grid.{method}]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
            if method in eager:
                lines.append('step = "eager"')
    path.write_text("\n".join(lines) + "\n")
    return path


def plan_protocol(phases: Phases, args: argparse.Namespace, data: str, eager: set[str]) -> None:
    """NoProp-DT's paper protocol at 10 epochs beside its twin, and FF's paper run (see above)."""
    work = phases.work
    unit = ["--dataset", args.dataset, "--data-dir", data, "--epochs", str(args.epochs),
            "--val-fraction", "0.1", "--device", args.device, "--inference-runs", "5",
            "--save-model", "--set", "preset=paper",
            *[f"{m}.step=eager" for m in ("noprop-dt", "backprop-blocks") if m in eager]]
    methods = ["--methods", "noprop-dt,backprop-blocks"]
    phases.run("alone", cli("run", *methods, "--seeds", "0", *unit, "--out",
                            str(work / "alone")), 240)
    print(f"[{time.strftime('%H:%M:%S')}] ff-paper: in the background", flush=True)
    ff = phases.start("ff-paper", cli("run", "--methods", "ff", "--dataset", args.dataset,
                                      "--data-dir", data, "--epochs", str(args.ff_epochs),
                                      "--batch-size", "100", "--device", args.device,
                                      "--set", "preset=paper", "--out", str(work / "ff-paper")))
    phases.run("seeds", cli("run", *methods, "--seeds", "1,2", *unit, "--out",
                            str(work / "seeds")), phases.left() - 45)
    folders = [str(work / "alone"), str(work / "seeds")]
    for folder in folders:
        phases.run(f"evaluate-{Path(folder).name}",
                   cli("evaluate", folder, "--data-dir", data, "--inference-runs", "5",
                       "--device", args.device, "--methods", "noprop-dt",
                       "--set", "sampler=ancestral,mean"), 20)
    phases.finish(ff, phases.left() - 25)
    phases.run("report", cli("report", *folders, str(work / "ff-paper"),
                             "--out", str(work / "report")), 20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget-s", type=float, default=560)
    parser.add_argument("--work-dir", help="where phases write (default OUT/work); only the "
                        "archive goes to OUT, for a device tool that returns few files")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to try the script")
    parser.add_argument("--sweep-epochs", type=int, default=10,
                        help="the ablation's epochs (its file says 10; fewer only to try the script)")
    parser.add_argument("--plan", choices=("checks", "protocol"), default="checks",
                        help="checks: the first session's device checks; protocol: see above")
    parser.add_argument("--dataset", default="mnist",
                        help="protocol plan's dataset (mnist; mnist-5k only to try the script)")
    parser.add_argument("--epochs", type=int, default=10, help="protocol plan's epochs per unit")
    parser.add_argument("--ff-epochs", type=int, default=60,
                        help="protocol plan's Forward-Forward epochs (its paper's 60)")
    args = parser.parse_args()
    out = Path(args.out)
    phases = Phases(out, args.budget_s, Path(args.work_dir) if args.work_dir else None)
    work = phases.work
    data = str(Path(args.data_dir).resolve())
    ensure_importable()

    phases.run("env", ["bash", "-c", "nvidia-smi; python3 -c 'import torch, sys; "
                       "print(sys.version, torch.__version__, torch.version.cuda)'; "
                       "git rev-parse HEAD; git status --porcelain | head; nproc"], 30)

    phases.run("cuda-tests", [sys.executable, "-m", "pytest", "tests/test_step_modes.py", "-k",
                              "cuda", "-q", "-rA", "-p", "no:cacheprovider",
                              "--benchmark-disable"], 120)
    log = (work / "cuda-tests.log").read_text() if (work / "cuda-tests.log").exists() else ""
    eager = graph_failures(log)
    (work / "eager_fallback.json").write_text(json.dumps(sorted(eager)))
    if args.plan == "protocol":
        plan_protocol(phases, args, data, eager)
        phases.save()
        return 0

    graphed = [m for m in COST_METHODS if m not in eager]
    common = ["--input", "mnist", "--repeats", "5", "--device", args.device]
    base_sets = ["preset=paper", "inference_steps=10"]  # 10: cheap predict-FLOP counting
    for batch in (128, 1024):
        for mode in ("eager", "graph"):
            methods = COST_METHODS if mode == "eager" else graphed
            if not methods:
                continue
            # The harness-overhead target is for the fast step; eager's is not asked for.
            overhead = ["--overhead-steps", "30"] if batch == 128 and mode == "graph" else []
            phases.run(f"cost-b{batch}-{mode}",
                       cli("cost", "--methods", ",".join(methods), "--batch-size", str(batch),
                           *common, *overhead, "--set", *base_sets, f"step={mode}",
                           "--out", str(work / f"cost-b{batch}-{mode}.csv")), 100)
        if "noprop-dt" not in eager:
            phases.run(f"cost-b{batch}-dt-stacked",
                       cli("cost", "--methods", "noprop-dt", "--batch-size", str(batch), *common,
                           "--set", "preset=paper", "step=graph", "blocks=stacked",
                           "--out", str(work / f"cost-b{batch}-dt-stacked.csv")), 45)

    # One unit at a time, for the units-per-hour comparison with the sweep below.
    phases.run("alone", cli("run", "--methods", "noprop-dt,backprop-blocks", "--dataset", "mnist",
                            "--data-dir", data, "--epochs", "2", "--val-fraction", "0.1",
                            "--device", args.device, "--set", "preset=paper",
                            "embedding=prototype",
                            *(["step=eager"] if "noprop-dt" in eager else []),
                            "--out", str(work / "alone")), 75)

    sweep = sweep_file(work / "ablation.toml", eager)
    sweep_dir = work / "ablation"
    phases.run("sweep", cli("sweep", str(sweep), "--data-dir", data, "--units-per-gpu", "12",
                            "--max-parallel", "12", "--epochs", str(args.sweep_epochs),
                            "--out", str(sweep_dir)), phases.left() - 70)
    phases.run("evaluate-noprop-dt",
               cli("evaluate", str(sweep_dir), "--data-dir", data, "--inference-runs", "3",
                   "--device", args.device, "--methods", "noprop-dt",
                   "--set", "sampler=ancestral,mean"), 30)
    phases.run("report", cli("report", str(sweep_dir), str(work / "alone"),
                             "--out", str(work / "report")), 25)
    evaluations = [("noprop-ct", ["inference_steps=10,100", "sampler=ancestral,mean"]),
                   ("noprop-fm", ["inference_steps=10,100", "sampler=euler,heun"])]
    for method, sets in evaluations:
        phases.run(f"evaluate-{method}",
                   cli("evaluate", str(sweep_dir), "--data-dir", data, "--inference-runs", "3",
                       "--device", args.device, "--methods", method, "--set", *sets), 30)
    phases.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
