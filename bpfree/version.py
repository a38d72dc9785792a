"""Which bpfree code runs: its commit, version and code digest, from the standard library only
(the report generators, which import no torch, use it too).

The commit is bpfree's own, never that of the directory a command runs in: from the git
clone the package was installed from when it is an editable install of one, else from the
package version, which setuptools-scm stamps with the commit at build time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

from bpfree import __version__

# setuptools-scm versions look like 0.1.dev12+g1a2b3c4 (.dYYYYMMDD when built dirty)
STAMP = re.compile(r"\+g([0-9a-f]{7,40})(\.d\d{8})?")


def source_checkout() -> Path | None:
    """The root of the bpfree git clone this code runs from, or None for an installed wheel."""
    root = Path(__file__).resolve().parents[1]
    project = root / "pyproject.toml"
    if (root / ".git").exists() and project.is_file() and 'name = "bpfree"' in project.read_text():
        return root
    return None


def git_commit() -> str:
    """The commit of the code that runs, with `-dirty` when tracked files differ from it."""
    root = source_checkout()
    if root is None:
        match = STAMP.search(__version__)
        if not match:
            return f"unknown (version {__version__})"
        return match.group(1) + ("-dirty" if match.group(2) else "")
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty else "")


def code_version() -> str:
    """bpfree's version, said of the code that runs. An installed wheel: its version, which
    names the commit it was built from. A git checkout (an editable install): its version
    was stamped when it was installed and goes stale with the next commit, so it is then
    given with the commit the code is actually at."""
    if source_checkout() is None:
        return __version__
    commit = git_commit()
    stamped = STAMP.search(__version__)
    if commit.startswith("unknown") or (stamped and commit.startswith(stamped.group(1))):
        return __version__
    return f"{__version__} (as installed; the code is at commit {commit})"


# bpfree's packages and their folders in a source checkout (pyproject.toml's package-dir; a
# test keeps the two equal).
PACKAGE_DIRS = {"bpfree": "bpfree", "bpfree.methods": "methods", "bpfree.reports": "reports",
                "bpfree.results": "results"}


def _digest(folders: dict[str, Path]) -> str:
    """SHA-256 (first 16 hex digits) of every module of the packages: name and content."""
    h = hashlib.sha256()
    for package in sorted(folders):
        for path in sorted(folders[package].glob("*.py")):
            h.update(f"{package}/{path.name}\0".encode())
            h.update(path.read_bytes())
            h.update(b"\0")
    return h.hexdigest()[:16]


def code_digest(checkout: Path | None = None) -> str:
    """A digest of the Python code of bpfree's packages: of the code that runs, or of the
    source checkout at `checkout`. Unlike a `-dirty` commit it names the code exactly, so a
    record made from a tree with other uncommitted changes (or with a stale .git, as a
    device's copy can have) is matched to a commit by the digest of that commit's checkout:
    `python -m bpfree.version DIR`."""
    if checkout is not None:
        return _digest({p: checkout / d for p, d in PACKAGE_DIRS.items()})
    folders = {}
    for package in PACKAGE_DIRS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            return "unknown"
        folders[package] = Path(list(spec.submodule_search_locations)[0])
    return _digest(folders)


if __name__ == "__main__":
    where = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    if where is not None and not (where / "bpfree" / "__init__.py").is_file():
        sys.exit(f"{where} is not a bpfree source checkout (no bpfree/__init__.py); pass the "
                 f"folder a `git clone` or `git worktree add` of bpfree made")
    print(code_digest(where))
