"""Runs the pinned buf CLI on a repository's protos/: lint, and breaking against an earlier commit.

What the baseline is, and why:
- On main (CI's clean clone), HEAD's first parent: the previous main commit, since a merge into
  main makes the branch's work one step of main's first-parent history.
- On a branch, the merge base with main (origin/main when there is one): everything the branch
  changes, and nothing main gained since the branch started (comparing with main's tip would call
  a field main added later "deleted" here).
- The last release tag (`v*`), once one exists, for switchyard.api.v1 only (buf.yaml says why).

The earlier protos are taken with `git archive`, not buf's own git input: that works the same in a
worktree, a shallow clone that holds the commit, and a commit from before buf.yaml existed.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "tools" / "buf" / "node_modules" / ".bin" / "buf"
PUBLIC_PROTOS = "protos/switchyard/api"
BUF_TIMEOUT_S = 120


@dataclass(frozen=True)
class Baseline:
    """A commit to compare with, or None and the reason there is none."""

    commit: str | None
    why: str


@dataclass(frozen=True)
class BufResult:
    returncode: int
    output: str  # stdout and stderr together, as a person would read them

    @property
    def rules(self) -> set[str]:
        """Rule ids of the findings, when buf ran with --error-format=json."""
        found = set()
        for line in self.output.splitlines():
            if line.startswith("{"):
                found.add(json.loads(line).get("type", ""))
        return found


def buf(*args: str, cwd: Path) -> BufResult:
    """Runs the pinned buf; AssertionError naming the fix when it is not installed."""
    if not BUF.exists():
        raise AssertionError(f"{BUF.relative_to(ROOT)} is missing: run `make buf` (make setup does it)")
    done = subprocess.run([str(BUF), *args], cwd=cwd, capture_output=True, text=True, timeout=BUF_TIMEOUT_S,
                          check=False)
    return BufResult(done.returncode, (done.stdout + done.stderr).strip())


def git(repo: Path, *args: str) -> str | None:
    """Stripped stdout of a git command, or None when it fails."""
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=60, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def previous_main_commit(repo: Path) -> Baseline:
    """The merge base with main on a branch, else HEAD's first parent (see the module docstring)."""
    head = git(repo, "rev-parse", "--verify", "--quiet", "HEAD^{commit}")
    if head is None:
        return Baseline(None, "not a git checkout, or one with no commit yet")
    for ref in ("origin/main", "main"):
        if git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}") is None:
            continue
        base = git(repo, "merge-base", "HEAD", ref)
        if base is not None and base != head:
            return Baseline(base, f"the merge base of HEAD and {ref}")
        break
    parent = git(repo, "rev-parse", "--verify", "--quiet", "HEAD^1^{commit}")
    if parent is not None:
        return Baseline(parent, "HEAD's first parent (on main: the previous main commit)")
    if git(repo, "rev-parse", "--is-shallow-repository") == "true":
        return Baseline(None, "this is a shallow clone without HEAD's parent: fetch one more commit "
                              "(git fetch --deepen=1, or clone with --depth 2) to compare with it")
    return Baseline(None, "HEAD is the first commit: there is no previous version to compare with")


def last_release_tag(repo: Path) -> str | None:
    """The newest release tag (v1.2.3) reachable from HEAD, or None before the first release."""
    return git(repo, "describe", "--tags", "--abbrev=0", "--match", "v[0-9]*", "HEAD")


def extract(repo: Path, commit: str, folder: str, into: Path) -> None:
    """Writes `folder` as it was at `commit` under `into` (into/folder/...)."""
    archive = subprocess.run(["git", "archive", "--format=tar", commit, folder], cwd=repo, capture_output=True,
                             timeout=60, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")


def breaking(repo: Path, commit: str, scratch: Path) -> BufResult:
    """`buf breaking` of the working tree's protos (every package) against those of `commit`."""
    against = scratch / "against"
    extract(repo, commit, "protos", against)
    return buf("breaking", "--against", str(against / "protos"), cwd=repo)


def public_breaking(repo: Path, commit: str, scratch: Path) -> BufResult:
    """`buf breaking` of switchyard.api.v1 alone, against `commit`: both sides are copies holding
    only the public folder (buf's --exclude-path does not apply to a directory --against)."""
    against, current = scratch / "against", scratch / "current"
    extract(repo, commit, PUBLIC_PROTOS, against)
    shutil.copytree(repo / PUBLIC_PROTOS, current / PUBLIC_PROTOS)
    shutil.copy2(repo / "buf.yaml", current / "buf.yaml")
    return buf("breaking", "--against", str(against / "protos"), cwd=current)
