"""The protos pass `buf lint` and make no breaking change (buf.yaml holds the rules and says why),
and both checks fail where they should: a renumbered field, a camelCase field, a missing comment.

These run in `make test` (a few seconds); README.md, "The gRPC API and compatibility", says how to run
them alone. The pinned buf comes from tools/buf (`make buf`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.protos.buf_checks import ROOT, breaking, buf, last_release_tag, previous_main_commit, public_breaking

API_PROTO = "protos/switchyard/api/v1/generation.proto"
WORKER_PROTO = "protos/switchyard/worker/v1/worker.proto"
# A field declaration at message level: "  optional int32 max_tokens = 1;" (type, name, number).
FIELD = re.compile(r"^  (?:optional |repeated )?([\w.]+) (\w+) = (\d+);$", re.M)


def test_pinned_buf_is_installed() -> None:
    pinned = json.loads((ROOT / "tools/buf/package.json").read_text())["devDependencies"]["@bufbuild/buf"]
    version = buf("--version", cwd=ROOT)
    assert version.returncode == 0, version.output
    assert version.output == pinned, f"tools/buf has buf {version.output}, package.json pins {pinned}: run `make buf`"


def test_lint() -> None:
    result = buf("lint", cwd=ROOT)
    assert result.returncode == 0, f"buf lint (rules in buf.yaml):\n{result.output}"


def test_no_breaking_change_since_previous_main_commit(tmp_path: Path) -> None:
    baseline = previous_main_commit(ROOT)
    if baseline.commit is None:
        pytest.skip(f"buf breaking not run: {baseline.why}")
    result = breaking(ROOT, baseline.commit, tmp_path)
    assert result.returncode == 0, (
        f"buf breaking against {baseline.commit[:12]} ({baseline.why}); buf.yaml says what may change:\n"
        f"{result.output}")


def test_public_api_unbroken_since_last_release(tmp_path: Path) -> None:
    tag = last_release_tag(ROOT)
    if tag is None:
        pytest.skip("buf breaking against the last release not run: no release tag (v*) yet")
    result = public_breaking(ROOT, tag, tmp_path)
    assert result.returncode == 0, f"switchyard.api.v1 breaks compatibility with release {tag}:\n{result.output}"


# --- The checks catch what they are for, in throwaway copies of the protos. ---

def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid",
                    "-c", "commit.gpgsign=false", "-c", "tag.gpgsign=false", *args],
                   cwd=repo, check=True, capture_output=True, timeout=60)


def _copy_protos(into: Path) -> Path:
    shutil.copytree(ROOT / "protos", into / "protos")
    shutil.copy2(ROOT / "buf.yaml", into / "buf.yaml")
    return into


def _repo_with_one_commit(tmp_path: Path) -> Path:
    repo = _copy_protos(tmp_path / "repo")
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", "buf.yaml", "protos")
    _git(repo, "commit", "-q", "-m", "protos as they are")
    return repo


def _renumber_a_field(repo: Path, path: str) -> tuple[str, str]:
    """Commits `path` with its first field's number moved up by 1000; returns (name, old number)."""
    file = repo / path
    text = file.read_text()
    found = FIELD.search(text)
    assert found is not None, f"no field declaration in {path}"
    _, name, number = found.groups()
    line = found.group(0)
    file.write_text(text.replace(line, line.replace(f" = {number};", f" = {int(number) + 1000};"), 1))
    _git(repo, "commit", "-q", "-a", "-m", f"renumber {name}")
    return name, number


@pytest.mark.parametrize("path", [API_PROTO, WORKER_PROTO], ids=["public", "internal"])
def test_renumbered_field_fails_breaking(tmp_path: Path, path: str) -> None:
    repo = _repo_with_one_commit(tmp_path)
    name, number = _renumber_a_field(repo, path)
    baseline = previous_main_commit(repo)
    assert baseline.commit is not None, baseline.why
    result = breaking(repo, baseline.commit, tmp_path / "scratch")
    assert result.returncode != 0, result.output
    assert re.search(rf'field "{number}" with name "{name}" .* was deleted', result.output), result.output


def test_release_check_covers_only_the_public_api(tmp_path: Path) -> None:
    repo = _repo_with_one_commit(tmp_path)
    _git(repo, "tag", "v0.1.0")
    _renumber_a_field(repo, WORKER_PROTO)
    assert last_release_tag(repo) == "v0.1.0"
    internal = public_breaking(repo, "v0.1.0", tmp_path / "internal")
    assert internal.returncode == 0, internal.output
    name, _ = _renumber_a_field(repo, API_PROTO)
    public = public_breaking(repo, "v0.1.0", tmp_path / "public")
    assert public.returncode != 0 and f'"{name}"' in public.output, public.output


def test_branch_is_compared_with_its_merge_base(tmp_path: Path) -> None:
    repo = _repo_with_one_commit(tmp_path)
    base = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout.strip()
    _git(repo, "checkout", "-q", "-b", "feature")
    _renumber_a_field(repo, API_PROTO)
    with (repo / API_PROTO).open("a") as f:
        f.write("// A later commit of the branch that breaks nothing.\n")
    _git(repo, "commit", "-q", "-a", "-m", "a comment")
    baseline = previous_main_commit(repo)
    assert baseline.commit == base, baseline.why  # not HEAD~1, which already has the break
    assert breaking(repo, base, tmp_path / "scratch").returncode != 0


def test_first_commit_has_no_baseline(tmp_path: Path) -> None:
    baseline = previous_main_commit(_repo_with_one_commit(tmp_path))
    assert baseline.commit is None and "first commit" in baseline.why


BAD_MESSAGES = {
    "FIELD_LOWER_SNAKE_CASE": "// A test message.\nmessage BadName {\n  // A count.\n  int32 maxTokens = 1;\n}\n",
    "COMMENT_FIELD": "// A test message.\nmessage NoComment {\n  int32 max_tokens = 1;\n}\n",
}


@pytest.mark.parametrize("rule", sorted(BAD_MESSAGES))
def test_lint_refuses_bad_proto(tmp_path: Path, rule: str) -> None:
    repo = _copy_protos(tmp_path)
    with (repo / API_PROTO).open("a") as f:
        f.write("\n" + BAD_MESSAGES[rule])
    result = buf("lint", "--error-format=json", cwd=repo)
    assert result.returncode != 0, result.output
    assert result.rules == {rule}, result.output


def test_buf_is_pinned_exactly() -> None:
    """An exact version in package.json and the lockfile: `npm ci` installs the same buf everywhere."""
    pinned = json.loads((ROOT / "tools/buf/package.json").read_text())["devDependencies"]["@bufbuild/buf"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", pinned), pinned
    lock = json.loads((ROOT / "tools/buf/package-lock.json").read_text())
    assert lock["packages"]["node_modules/@bufbuild/buf"]["version"] == pinned
