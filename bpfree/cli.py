"""The `bpfree` command line: list, run, report, evaluate, sweep, tune, check, cost.

Every user mistake ends in one line on stderr naming the problem and the fix, and exit code 2;
tracebacks are kept for bugs.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import sys
from pathlib import Path

from bpfree import __version__, options
from bpfree.data import DATASETS, check_batch_size, load_dataset
from bpfree.harness import Budget, Unit, pending, resolve_device, run_units
from bpfree.methods import ConfigError, all_methods, broken_modules, get_method
from bpfree.provenance import environment
from bpfree.records import RecordsError, Status, merge_run, start_run, write_csv
from bpfree.reports.load import ReportError
from bpfree.suites import SUITES, add_twins, describe_recorded
from bpfree.version import git_commit

EXIT_CODES = """exit codes:
  0  everything asked for finished (a diverged unit is a result: it counts as finished)
  1  some unit failed or was left to another process holding it, or `bpfree check` failed
     the gate; the records of the others are written, and a re-run retries what is missing
  2  a usage error, bad input, an unusable record or a full disk: one line on stderr names
     it and what to do (units finished before it stay finished)"""


def cmd_list(args: argparse.Namespace) -> None:
    print("methods:")
    for name, cls in all_methods().items():
        print(f"  {name:<16} {cls.family:<18} {cls.description}")
        print(f"  {'':<16} presets: {', '.join(cls.presets)}")
    broken = broken_modules()
    if broken:
        print("broken method modules (their methods are missing until fixed):")
        for module, error in broken.items():
            print(f"  {module:<16} {error}")
    print("datasets:")
    for name, info in DATASETS.items():
        print(f"  {name:<16} {info.description}")
    print("suites:")
    for name, suite in SUITES.items():
        print(f"  {name:<16} {suite.description}")


def parse_sets(pairs: list[str], methods: list[str]) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """`--set` pairs -> (preset override or {}, per-method overrides).

    `key=value` applies to every selected method that has `key`; `method.key=value` to one.
    `preset=NAME` picks a preset for all methods.
    """
    preset: dict[str, str] = {}
    per_method: dict[str, dict[str, str]] = {m: {} for m in methods}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r} is not key=value")
        key, value = pair.split("=", 1)
        if key == "preset":
            preset["preset"] = value
            continue
        target, _, field = key.rpartition(".")
        if target:
            if target not in per_method:
                raise ConfigError(f"--set {pair}: method {target!r} is not in this run ({', '.join(methods)})")
            per_method[target][field] = value
            continue
        takers = [m for m in methods if field in get_method(m).Config.__dataclass_fields__]
        if not takers:
            raise ConfigError(f"--set {pair}: no selected method has a hyperparameter {field!r} "
                              f"(see `bpfree list` and docs/)")
        for m in takers:
            per_method[m][field] = value
    return preset, per_method


# What a run folder's units all share: resuming with another value would mix two budgets.
# The data fingerprint comes last: another --val-fraction changes it too, and is named first.
RUN_BUDGET = ("dataset", "epochs", "batch_size", "device", "val_fraction", "target_acc",
              "inference_runs", "data")


def cmd_run(args: argparse.Namespace) -> int:
    suite = SUITES.get(args.suite or "quick")
    if suite is None:
        raise ConfigError(f"unknown suite {args.suite!r}; known: {', '.join(SUITES)}")
    methods = options.check_methods(args.methods.split(",") if args.methods
                                    else suite.methods or all_methods())
    dataset = args.dataset or suite.dataset
    options.check_dataset(dataset)
    epochs = options.at_least("--epochs", args.epochs if args.epochs is not None else suite.epochs)
    batch_size = options.at_least("--batch-size", args.batch_size if args.batch_size is not None
                                  else suite.batch_size)
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else suite.seeds
    except ValueError:
        raise ConfigError(f"--seeds {args.seeds!r} is not a comma-separated list of integers") from None
    options.check_seeds(seeds)
    options.check_val_fraction(args.val_fraction)
    options.check_target_acc(args.target_acc)
    inference_runs = options.at_least("--inference-runs", args.inference_runs
                                      if args.inference_runs is not None else suite.inference_runs)
    preset_set, per_method = parse_sets([p for group in args.set for p in group], methods)
    preset = preset_set.get("preset", suite.preset)
    from bpfree.tune import TUNED_DIR, resolve_preset  # preset=tuned: the tuned values

    tuned_dir = Path(args.tuned_dir) if args.tuned_dir else TUNED_DIR
    units = [
        Unit(m, dataset, seed, preset,
             tuple(sorted(resolve_preset(m, dataset, preset, per_method[m], tuned_dir).items())))
        for m in methods
        for seed in seeds
    ]
    for unit in units:
        unit.config()  # every hyperparameter is checked before anything runs
    # Backprop on each method's own network, so that every method has a like-for-like
    # reference: with --twins, or for a suite that asks for them when it picks the methods.
    twins = add_twins(units) if args.twins or (suite.twins and not args.methods) else []
    units += twins
    device = resolve_device(args.device)
    budget = Budget(epochs=epochs, batch_size=batch_size, device=args.device,
                    target_accuracy=args.target_acc, inference_runs=inference_runs,
                    keep_model=args.save_model)
    # The data is loaded (and checked) before any folder is made for it.
    data = load_dataset(dataset, args.data_dir, args.download, args.val_fraction)
    check_batch_size(batch_size, data, "--batch-size")

    spec = {"methods": list(methods), "dataset": dataset, "data": data.fingerprint(),
            "seeds": list(seeds), "preset": preset,
            "sets": sorted(p for group in args.set for p in group),
            "twins": [f"{u.method} " + " ".join(f"{k}={v}" for k, v in u.overrides)
                      for u in twins],
            "epochs": epochs,
            "batch_size": batch_size, "device": args.device, "val_fraction": args.val_fraction,
            "target_acc": args.target_acc, "inference_runs": inference_runs}
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    run_dir = Path(args.out) if args.out else Path("results/runs") / f"{args.suite or 'quick'}-{dataset}-{digest}"
    start_run(run_dir, spec, "bpfree " + " ".join(sys.argv[1:]), environment(device), RUN_BUDGET)

    todo = pending(units, {dataset: data}, budget, run_dir)
    print(f"bpfree: {len(units)} unit(s), {len(todo)} to train -> {run_dir}", flush=True)
    results = run_units(units, {dataset: data}, budget, run_dir, progress=sys.stderr.isatty())
    merge_run(run_dir)
    from bpfree.reports.report import write_report

    report_path, text = write_report([run_dir], describe=describe_recorded)
    print(text)
    print(f"records: {run_dir / 'records.csv'}\nsummary: {run_dir / 'summary.csv'}\nreport:  {report_path}")
    failed = [r for r in results if r.summary.get("status") == Status.FAILED]
    busy = [r for r in results if r.busy]
    if failed:
        every = f"all {len(units)}" if len(failed) == len(units) else f"{len(failed)} of {len(units)}"
        print(f"bpfree: {every} unit(s) failed: "
              f"{', '.join(r.summary['unit'] for r in failed)} (see their failed.json); "
              f"run the same command again to retry them", file=sys.stderr)
    if busy:
        print(f"bpfree: {len(busy)} unit(s) left to another process that is training them "
              f"({busy[0].busy}): {', '.join(r.summary['unit'] for r in busy)}; run the same "
              f"command again once it ends to collect them", file=sys.stderr)
    return 1 if failed or busy else 0


def cmd_report(args: argparse.Namespace) -> None:
    from bpfree.reports.report import parse_formats, write_report

    path, text = write_report([Path(d) for d in args.run_dirs], Path(args.out) if args.out else None,
                              parse_formats(args.formats), describe=describe_recorded)
    print(text)
    print(f"report: {path}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from bpfree.evaluate import evaluate_run

    frame = evaluate_run(Path(args.run_dir), [p for group in args.set for p in group],
                         args.inference_runs, args.data_dir, args.device,
                         methods=args.methods.split(",") if args.methods else None)
    print(frame.drop(columns=["setting"]).to_string(index=False))
    print(f"appended {len(frame)} row(s) to {Path(args.run_dir) / 'evaluations.csv'}")


def cmd_check(args: argparse.Namespace) -> int:
    from bpfree.check import default_baseline, run_check

    return run_check(Path(args.baseline) if args.baseline else default_baseline(args.update),
                     args.update)


def cmd_sweep(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from bpfree.reports.report import write_report
    from bpfree.sweep import load_sweep, run_sweep

    sweep = load_sweep(args.sweep)
    if args.data_dir:
        sweep = replace(sweep, data_dir=args.data_dir)
    if args.tuned_dir:
        sweep = replace(sweep, tuned_dir=args.tuned_dir)
        sweep.units()  # the tuned presets of that folder are checked before anything runs
    if args.epochs is not None:
        if args.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {args.epochs}")
        sweep = replace(sweep, epochs=(args.epochs,))
    if args.units_per_gpu is not None:
        if args.units_per_gpu < 1:
            raise ConfigError(f"--units-per-gpu must be >= 1, got {args.units_per_gpu}")
        sweep = replace(sweep, units_per_gpu=args.units_per_gpu)
    out = Path(args.out) if args.out else Path("results/sweeps") / Path(args.sweep).stem
    result = run_sweep(sweep, out, args.executor, args.address, args.max_parallel,
                       args.max_retries, progress=sys.stderr.isatty())
    print(f"bpfree: {result.total} unit(s): {result.skipped} already done, {result.finished} "
          f"finished now, {result.failed} failed -> {result.sweep_dir}", file=sys.stderr)
    path, text = write_report([result.sweep_dir], describe=describe_recorded)
    print(text)
    print(f"report: {path}")
    return 1 if result.failed else 0


def cmd_cost(args: argparse.Namespace) -> None:
    from bpfree.cost import SHAPES, markdown, step_costs

    methods = args.methods.split(",")
    for name in methods:
        get_method(name)
    shapes = args.input.split(",")
    for shape in shapes:
        if shape not in SHAPES:
            raise ConfigError(f"unknown input {shape!r}; known: {', '.join(SHAPES)}")
    if args.batch_size < 1 or args.repeats < 1:
        raise ConfigError("--batch-size and --repeats must be >= 1")
    preset_set, per_method = parse_sets([p for group in args.set for p in group], methods)
    device = resolve_device(args.device)
    if args.overhead_steps < 0:
        raise ConfigError(f"--overhead-steps must be >= 0, got {args.overhead_steps}")
    env = environment(device)

    def save(frame) -> None:  # the rows so far, after each method
        if args.out:
            write_csv(Path(args.out), frame.assign(**{k: str(v) for k, v in env.items()}))

    frame = step_costs(methods, shapes, device, args.batch_size,
                       preset_set.get("preset", "quick"), per_method, args.repeats,
                       args.overhead_steps,
                       progress=lambda what: print(f"bpfree cost: {what}", file=sys.stderr,
                                                   flush=True),
                       on_row=save)
    print(markdown(frame))
    print(f"\n{env['device_name']} ({env['device']}), torch {env['torch']}, "
          f"{env['torch_threads']} threads, commit {env['git_commit']}")
    if args.out:
        print(f"wrote {args.out}")


def cmd_tune(args: argparse.Namespace) -> None:
    from bpfree.tune import TUNED_DIR, tune_method

    preset, per_method = parse_sets([p for group in args.set for p in group], [args.method])
    if preset:
        raise ConfigError("bpfree tune: pick the starting preset with --preset, not --set preset=")
    path, content = tune_method(
        args.method, args.dataset, args.trials, args.epochs, preset=args.preset,
        fixed=per_method[args.method], val_fraction=args.val_fraction,
        batch_size=args.batch_size, device=args.device, seed=args.seed, data_dir=args.data_dir,
        address=args.address, cpus_per_trial=args.cpus_per_trial,
        out_dir=Path(args.out) if args.out else TUNED_DIR)
    print(f"best of {args.trials} trials: {content['tuned']} (val_acc {content['val_acc']:.4f})")
    hint = "" if path.parent == TUNED_DIR else f" --tuned-dir {path.parent}"
    print(f"tuned preset: {path}  (use it with `bpfree run --set preset=tuned{hint}`)")


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default after its help, unless the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" not in text and action.default not in (None, False, [], argparse.SUPPRESS)
                and action.option_strings):
            text += " (default: %(default)s)"
        return text


class RawEpilogFormatter(HelpFormatter):
    """Keeps the epilog's line breaks (the exit-code table)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bpfree", description=__doc__.splitlines()[0],
                                     epilog=EXIT_CODES, formatter_class=RawEpilogFormatter)
    parser.add_argument("--version", action="version",
                        version=f"bpfree {__version__} (commit {git_commit()})")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser = functools.partial(sub.add_parser, formatter_class=HelpFormatter)

    sub.add_parser("list", help="registered methods, datasets and suites").set_defaults(fn=cmd_list)

    run = sub.add_parser("run", help="train and measure methods (default: the quick suite)")
    run.add_argument("--suite", help=f"named suite ({', '.join(SUITES)}); default quick")
    run.add_argument("--methods", help="comma-separated method names (default: the suite's)")
    run.add_argument("--dataset", help="dataset name (default: the suite's)")
    run.add_argument("--epochs", type=int, help="epochs per unit (default: the suite's)")
    run.add_argument("--seeds", help="comma-separated integers, e.g. 0,1,2")
    run.add_argument("--batch-size", type=int, help="training minibatch size (default: the suite's)")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                     help="auto: cuda when torch sees a GPU, else cpu")
    run.add_argument("--data-dir", help="folder holding the dataset's files")
    run.add_argument("--download", action="store_true", help="download the dataset into --data-dir")
    run.add_argument("--out", help="run folder (default results/runs/<suite>-<dataset>-<hash>)")
    run.add_argument("--set", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                     help="hyperparameter overrides: key=value, method.key=value, preset=NAME")
    run.add_argument("--twins", action="store_true",
                     help="also run each method's backprop twin (backprop on the same network; "
                          "the quick suite does this unless --methods is given)")
    run.add_argument("--val-fraction", type=float, default=0.0,
                     help="carve a stratified validation split of this fraction from train")
    run.add_argument("--target-acc", type=float, help="accuracy for time-to-target (default per dataset)")
    run.add_argument("--inference-runs", type=int,
                     help="evaluation passes averaged for methods whose prediction samples "
                          "(NoProp: the paper uses 5); recorded as mean and standard error "
                          "(default: the suite's; 5 for paper-mnist, else 1)")
    run.add_argument("--save-model", action="store_true",
                     help="keep each unit's trained model in model.pt, for `bpfree evaluate`")
    run.add_argument("--tuned-dir", help="folder of tuned presets for --set preset=tuned (what "
                                         "`bpfree tune --out` wrote; default results/tuned)")
    run.set_defaults(fn=cmd_run)

    report = sub.add_parser("report", help="tables and plots from run folders")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run or sweep folders; several are merged into one report")
    report.add_argument("--out", help="output folder (default RUN_DIR/report; needed for several runs)")
    report.add_argument("--formats", default="md,html,tex,csv",
                        help="comma-separated subset of md,html,tex,csv (default: all)")
    report.set_defaults(fn=cmd_report)

    ev = sub.add_parser("evaluate", help="test accuracy of saved models (run --save-model, "
                                         "sweep keep_model) "
                                         "under other inference settings, without retraining")
    ev.add_argument("run_dir", metavar="RUN_DIR",
                    help="a run folder trained with --save-model, or a sweep folder of a "
                         "sweep with keep_model = true")
    ev.add_argument("--set", nargs="+", action="append", default=[], metavar="KEY=V1,V2",
                    help="inference settings to try, every combination: inference_steps, "
                         "sampler, step (default: as trained)")
    ev.add_argument("--inference-runs", type=int, default=5,
                    help="evaluation passes averaged per setting (default 5, as the NoProp paper)")
    ev.add_argument("--methods", help="comma-separated: evaluate only these methods' units")
    ev.add_argument("--data-dir", help="folder holding the dataset's files (default for a "
                                       "sweep folder: its sweep file's data_dir)")
    ev.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto: cuda when torch sees a GPU, else cpu")
    ev.set_defaults(fn=cmd_evaluate)

    check = sub.add_parser("check", help="CI regression gate: deterministic metrics vs the baseline")
    check.add_argument("--baseline", help="baseline CSV (default results/baseline/ci.csv)")
    check.add_argument("--update", action="store_true",
                       help="rewrite the baseline with the current measurements")
    check.set_defaults(fn=cmd_check)

    cost = sub.add_parser("cost", help="time, FLOPs and memory of one training step on random inputs")
    cost.add_argument("--methods", required=True, help="comma-separated method names")
    cost.add_argument("--input", default="mnist", help="comma-separated input shapes: mnist (1x28x28, "
                                                       "10 classes), cifar (3x32x32, 100 classes)")
    cost.add_argument("--batch-size", type=int, default=128, help="images per training step")
    cost.add_argument("--repeats", type=int, default=10, help="timed steps after one warm-up")
    cost.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                      help="auto: cuda when torch sees a GPU, else cpu")
    cost.add_argument("--set", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                      help="hyperparameter overrides, as for run (preset=NAME; default quick)")
    cost.add_argument("--overhead-steps", type=int, default=0,
                      help="also time the harness's epoch loop against a bare loop of this many "
                           "steps (0: skip)")
    cost.add_argument("--out", help="also write the rows, with the environment, to this CSV")
    cost.set_defaults(fn=cmd_cost)

    sweep = sub.add_parser("sweep", help="run a sweep file's grid of units, resumably (docs/sweeps.md)")
    sweep.add_argument("sweep", metavar="SWEEP.toml",
                       help="a sweep file (docs/sweeps.md), or the name of a bundled one")
    sweep.add_argument("--executor", default="local", choices=["local", "ray"],
                       help="local worker processes, or tasks on a Ray cluster")
    sweep.add_argument("--address", help="Ray cluster to join (`auto`: the one `ray start` made); "
                                         "default: start a private local one")
    sweep.add_argument("--max-parallel", type=int,
                       help="units at once (default: 1 locally, what the cluster fits on Ray)")
    sweep.add_argument("--epochs", type=int,
                       help="every unit's epoch budget, in place of the file's epochs")
    sweep.add_argument("--units-per-gpu", type=int,
                       help="units sharing one GPU at once (default: the file's, or 1); on Ray "
                            "each asks for 1/N of a GPU, locally N workers per GPU")
    sweep.add_argument("--max-retries", type=int, help="retries of a failed unit (default: the file's, or 1)")
    sweep.add_argument("--data-dir", help="folder holding the datasets' files (overrides the file's)")
    sweep.add_argument("--out", help="sweep folder (default results/sweeps/<file name>)")
    sweep.add_argument("--tuned-dir", help="folder of tuned presets for preset = \"tuned\" "
                                           "(overrides the file's tuned_dir)")
    sweep.set_defaults(fn=cmd_sweep)

    tune = sub.add_parser("tune", help="equal-budget hyperparameter search on a validation split")
    tune.add_argument("method", help="the method to tune (see `bpfree list`)")
    tune.add_argument("--dataset", required=True, help="dataset name (see `bpfree list`)")
    tune.add_argument("--trials", type=int, default=20, help="trials (the same for every method; default 20)")
    tune.add_argument("--epochs", type=int, default=5, help="epochs per trial, ASHA's max_t (default 5)")
    tune.add_argument("--preset", default="default", help="preset the search starts from")
    tune.add_argument("--set", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                      help="hyperparameters fixed during the search")
    tune.add_argument("--val-fraction", type=float, default=0.1,
                      help="validation split carved from train, the selection signal (default 0.1)")
    tune.add_argument("--batch-size", type=int, default=128, help="training minibatch size")
    tune.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                      help="auto: cuda when torch sees a GPU, else cpu")
    tune.add_argument("--seed", type=int, default=0, help="seeds the trials and the random search")
    tune.add_argument("--data-dir", help="folder holding the dataset's files")
    tune.add_argument("--address", help="Ray cluster to join (default: start a private local one)")
    tune.add_argument("--cpus-per-trial", type=int, default=1,
                      help="CPUs (torch threads) each trial asks Ray for")
    tune.add_argument("--out", help="folder for the tuned preset and Ray Tune's trial folders "
                                    "(default results/tuned)")
    tune.set_defaults(fn=cmd_tune)
    return parser


def hoist_sets(argv: list[str]) -> list[str]:
    """Move every `--set` and its KEY=VALUE words to the end of the command line.

    `--set` takes any number of words, so argparse would also swallow a positional argument
    written after it (`bpfree evaluate --set sampler=mean RUN`); only words holding `=` are
    its values, and the rest stay where they were.
    """
    rest: list[str] = []
    sets: list[str] = []
    words = iter(argv)
    for word in words:
        if word != "--set":
            rest.append(word)
            continue
        sets.append(word)
        for value in words:
            if "=" in value and not value.startswith("-"):
                sets.append(value)
            else:
                rest.append(value)
                break
    return rest + sets


USER_ERRORS = (ConfigError, RecordsError, ReportError)


def main(argv: list[str] | None = None) -> int:
    """Run one verb; returns its exit code (EXIT_CODES)."""
    args = build_parser().parse_args(hoist_sets(sys.argv[1:] if argv is None else argv))
    try:
        code = args.fn(args)
    except USER_ERRORS as exc:
        print(f"bpfree: error: {exc}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
