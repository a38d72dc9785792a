"""Run folders on disk: atomic writes, their permissions and failures, locks, stale
temporaries, and what `start_run` refuses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from bpfree.records import (
    LockHeld,
    RecordsError,
    exclusive,
    remove_stale_temporaries,
    start_run,
    write_csv,
    write_json,
)

SPEC = {"methods": ["backprop"], "epochs": 1, "batch_size": 128, "data": "abc"}


def test_records_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_csv(tmp_path / "records.csv", pd.DataFrame({"a": [1]}))
    finally:
        os.umask(old)
    assert (tmp_path / "records.csv").stat().st_mode & 0o777 == 0o644
    assert list(tmp_path.iterdir()) == [tmp_path / "records.csv"]  # no temporary left


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_is_one_line_naming_the_file_and_keeps_the_old_version(tmp_path,
                                                                          monkeypatch):
    path = tmp_path / "summary.json"
    write_json(path, {"v": 1})

    def full(p: Path, text: str) -> None:  # the kernel's own ENOSPC, from /dev/full
        with open("/dev/full", "w") as handle:
            handle.write(text)
            handle.flush()

    monkeypatch.setattr(Path, "write_text", lambda self, text: full(self, text))
    with pytest.raises(RecordsError) as info:
        write_json(path, {"v": 2})
    message = str(info.value)
    assert str(path) in message and "No space left on device" in message
    assert "free some space" in message and "\n" not in message
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_start_run_refuses_a_folder_of_other_files_and_leaves_it_as_it_was(tmp_path):
    (tmp_path / "thesis.tex").write_text("mine")
    with pytest.raises(RecordsError, match="holds files but is not a bpfree run.*thesis.tex"):
        start_run(tmp_path, SPEC, "bpfree run", {}, ("epochs",))
    assert [p.name for p in tmp_path.iterdir()] == ["thesis.tex"]


@pytest.mark.parametrize("key,value", [("epochs", 3), ("batch_size", 32), ("data", "def")])
def test_start_run_refuses_another_budget_naming_the_key(tmp_path, key, value):
    start_run(tmp_path, SPEC, "bpfree run", {}, ("epochs", "batch_size", "data"))
    with pytest.raises(RecordsError) as info:
        start_run(tmp_path, {**SPEC, key: value}, "bpfree run", {},
                  ("epochs", "batch_size", "data"))
    assert key in str(info.value) and "another --out" in str(info.value)
    start_run(tmp_path, {**SPEC, "methods": ["backprop", "fa"]}, "bpfree run", {},
              ("epochs", "batch_size", "data"))  # more methods: more units, same budget
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["spec"]["methods"] == ["backprop", "fa"] and len(meta["resumed"]) == 1


def test_a_lock_excludes_every_other_open_and_is_released_on_exit(tmp_path):
    """flock locks belong to an open file description: a second open, in this process or
    another, is refused while the first holds it."""
    path = tmp_path / "unit" / ".lock"
    with exclusive(path):
        assert f"pid {os.getpid()}" in path.read_text()
        with pytest.raises(LockHeld) as info:
            with exclusive(path, wait_s=0):
                pass
        assert f"pid {os.getpid()}" in info.value.holder
        with pytest.raises(LockHeld):
            with exclusive(path, wait_s=0.3):  # polls, then gives up
                pass
    with exclusive(path, wait_s=0):  # released
        pass


def test_stale_temporaries_of_unit_files_are_removed_and_nothing_else(tmp_path):
    stale = [tmp_path / ".checkpoint.pt.k3j2.tmp", tmp_path / ".records.csv.a1.tmp",
             tmp_path / ".summary.json.zz.tmp"]
    kept = [tmp_path / "checkpoint.pt", tmp_path / ".attempts.json.q.tmp",
            tmp_path / "notes.tmp"]
    for path in stale + kept:
        path.write_text("x")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(kept)


def test_the_recorded_version_names_the_code_that_ran(monkeypatch, tmp_path):
    """An editable install's version was stamped with the commit it was installed at; after
    further commits meta.json said that old commit's version (`bpfree` field) next to the new
    `git_commit`. A checkout now gives the stamp with the commit the code is at; a wheel and
    an up-to-date install give the plain version."""
    from bpfree import version

    monkeypatch.setattr(version, "__version__", "0.1.1.dev90+gd1ca9cf8f")
    monkeypatch.setattr(version, "source_checkout", lambda: tmp_path)
    monkeypatch.setattr(version, "git_commit", lambda: "6218799bac4ba660149dd79cdd99c71dd23cf867")
    assert version.code_version() == ("0.1.1.dev90+gd1ca9cf8f (as installed; the code is at "
                                      "commit 6218799bac4ba660149dd79cdd99c71dd23cf867)")
    monkeypatch.setattr(version, "git_commit", lambda: "d1ca9cf8f0123456789abcdef0123456789abcde")
    assert version.code_version() == "0.1.1.dev90+gd1ca9cf8f"
    monkeypatch.setattr(version, "source_checkout", lambda: None)  # an installed wheel
    monkeypatch.setattr(version, "git_commit", lambda: "6218799bac4ba660149dd79cdd99c71dd23cf867")
    assert version.code_version() == "0.1.1.dev90+gd1ca9cf8f"


def test_the_code_digest_names_the_code_not_the_tree(tmp_path):
    """A `-dirty` commit cannot be traced (the device's copy of this repository once carried
    a stale .git, and its records named the wrong commit); the code digest can: it is that of
    the package modules alone, equal for the running code and its checkout, changed by a
    change to any module and by nothing else."""
    import shutil

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    from bpfree import version

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert version.PACKAGE_DIRS == project["tool"]["setuptools"]["package-dir"]
    assert version.code_digest() == version.code_digest(root)  # the code that runs is this
    copy = tmp_path / "checkout"
    for folder in version.PACKAGE_DIRS.values():
        shutil.copytree(root / folder, copy / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "evidence", "runs"))
    before = version.code_digest(copy)
    assert before == version.code_digest(root)
    (copy / "results" / "notes.md").write_text("not code")
    (copy / "bpfree" / "sweeps" / "extra.py").write_text("# a file of no package\n")
    assert version.code_digest(copy) == before
    harness = copy / "bpfree" / "harness.py"
    harness.write_text(harness.read_text() + "\n# one more line\n")
    assert version.code_digest(copy) != before


def test_a_cpu_run_records_which_cpu_not_only_the_architecture():
    """The same NoProp-DT step ran at 76% of the matmul rate on an AMD EPYC and 33% on an
    Intel Xeon, both "x86_64" to `platform`: records (meta.json, a sweep's worker.json) name
    the CPU model where Linux gives it."""
    import torch

    from bpfree.provenance import environment

    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in
              (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
              if line.startswith("model name")]
    name = environment(torch.device("cpu"))["device_name"]
    if not models:
        pytest.skip("this machine's CPU model is not in /proc/cpuinfo")
    assert name == models[0]
