"""The Python client package as a user gets it: the wheel built from clients/python (the way
`make client-python` and CI build it), installed into a fresh virtualenv that holds nothing but the
wheel and its pinned dependencies, driving a real stack started as processes.

Each test runs `python_client_checks.py SCENARIO` with that virtualenv's python and asserts on the JSON
it prints. The retry and TLS scenarios run against a scripted fake server inside that script (the
client's own generated servicer), so that attempts can be counted and failures placed exactly before
or after the first token.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.stack import start_stack, stop_stack
from tests.deploy.test_stack import make_config
from tests.security.certs import CertificateAuthority

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CLIENT_DIR = REPO / "clients" / "python"
CHECKS = Path(__file__).with_name("python_client_checks.py")
API_KEY = "sk-client-3b9f2e7a41c6"
PROMPT = "def main():"
CLEAN_ENV = {"PATH": "/usr/bin:/bin"}  # no PYTHONPATH: the repository's own stubs must not leak in


def requirement_pins(text: str) -> dict[str, str]:
    return dict(re.findall(r'^"?([A-Za-z0-9_.-]+)==([^"\s,]+)', text.replace(", ", "\n"), flags=re.MULTILINE))


def test_client_pins_match_requirements_txt() -> None:
    project = requirement_pins((REPO / "requirements.txt").read_text())
    client = (CLIENT_DIR / "pyproject.toml").read_text()
    dependencies = requirement_pins(re.search(r"^dependencies = \[(.*)\]", client, re.MULTILINE).group(1))
    build = requirement_pins(re.search(r"^requires = \[(.*)\]", client, re.MULTILINE).group(1))
    assert dependencies == {"grpcio": project["grpcio"], "protobuf": project["protobuf"]}
    assert build["grpcio-tools"] == project["grpcio-tools"] and "setuptools" in build


def build_and_install(tmp: Path) -> subprocess.Popen[str]:
    """Starts building the wheel (isolated build: the pinned setuptools and grpcio-tools) and installing
    it into a fresh venv, in the background, so it overlaps the stack's start."""
    script = f"""set -euo pipefail
{sys.executable} -m pip wheel --quiet --no-deps --wheel-dir {tmp}/dist {CLIENT_DIR}
{sys.executable} -m venv {tmp}/venv
{tmp}/venv/bin/python -m pip install --quiet --disable-pip-version-check {tmp}/dist/switchyard_client-*.whl
"""
    return subprocess.Popen(["bash", "-c", script], cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@pytest.fixture(scope="module")
def env(tiny_model_dir, tmp_path_factory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("client")
    building = build_and_install(tmp)
    run_dir = tmp_path_factory.mktemp("run")
    (run_dir / "keys").write_text(f"app:{API_KEY}\n")
    config = make_config(run_dir, tiny_model_dir, services=("worker", "scheduler", "tokenizer"), num_workers=1,
                         tokenizer_args=("--api-keys-file", str(run_dir / "keys")))
    try:
        stack = start_stack(config)
        output, _ = building.communicate(timeout=300)
        assert building.returncode == 0, f"building or installing the wheel failed:\n{output}"
        yield {"python": tmp / "venv" / "bin" / "python", "address": stack.tokenizer_address, "tmp": tmp}
    finally:
        if building.poll() is None:
            building.kill()
        stop_stack(config.run_dir, quiet=True)


def check(env: dict[str, Any], scenario: str, **args: Any) -> dict[str, Any]:
    # cwd is a temporary folder and PYTHONPATH is cleared: only the installed wheel can be imported.
    done = subprocess.run([str(env["python"]), str(CHECKS), scenario, json.dumps(args)], cwd=env["tmp"],
                          capture_output=True, text=True, timeout=120, env=CLEAN_ENV)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_fresh_venv_has_only_the_wheel_and_its_pins(env) -> None:
    listed = subprocess.run([str(env["python"]), "-m", "pip", "list", "--format=json"], capture_output=True,
                            text=True, check=True).stdout
    installed = {p["name"].lower(): p["version"] for p in json.loads(listed)}
    project = requirement_pins((REPO / "requirements.txt").read_text())
    assert installed["switchyard-client"] == "0.1.0"
    assert installed["grpcio"] == project["grpcio"] and installed["protobuf"] == project["protobuf"]
    assert "grpcio-tools" not in installed and "switchyard" not in installed
    probe = subprocess.run([str(env["python"]), "-c", "import switchyard"], capture_output=True, cwd=env["tmp"],
                           env=CLEAN_ENV)
    assert probe.returncode != 0  # the client's stubs live inside its package, not as `switchyard`


def test_sync_generate_chat_tokenize_model_info(env) -> None:
    out = check(env, "sync", address=env["address"], api_key=API_KEY, prompt=PROMPT)
    generated = out["generate"]
    assert generated["finish_reason"] == "length" and len(generated["token_ids"]) == 12
    assert generated["text"] and generated["usage_only_on_last"]
    assert generated["usage"] == [len(out["prompt_ids"]), 12, generated["usage"][2]]
    chat = out["chat"]
    assert chat["finish_reason"] == "length" and len(chat["token_ids"]) == 8 and chat["usage"][1] == 8
    assert len(out["chat_prompt_ids"]) > len(out["prompt_ids"])  # the chat template's tokens
    model, max_model_len, vocab_size, _ = out["model_info"]
    assert model == "tiny-llama" and max_model_len > 0 and vocab_size > max(generated["token_ids"])
    assert out["early_break_tokens"] >= 1
    assert out["enable_retries"] == 1
    policy = out["service_config"]["methodConfig"][0]
    assert policy["name"] == [{"service": "switchyard.api.v1.Generation"}]
    assert policy["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]


def test_async_generate_matches_sync(env) -> None:
    sync = check(env, "sync", address=env["address"], api_key=API_KEY, prompt=PROMPT)
    out = check(env, "async", address=env["address"], api_key=API_KEY, prompt=PROMPT)
    assert out["generate"]["token_ids"] == sync["generate"]["token_ids"]  # greedy: the same tokens
    assert out["generate"]["text"] == sync["generate"]["text"]
    assert out["generate"]["usage"][:2] == sync["generate"]["usage"][:2]
    assert out["generate_2"]["finish_reason"] == "length" and len(out["generate_2"]["token_ids"]) == 12
    assert out["chat"]["token_ids"] and out["chat"]["usage"][1] == 8
    assert out["prompt_ids"] == sync["prompt_ids"] and out["model_info"][0] == "tiny-llama"
    assert out["deadline"]["type"] == "DeadlineExceeded"


def test_errors_are_typed_with_field(env) -> None:
    out = check(env, "errors", address=env["address"], api_key=API_KEY, prompt=PROMPT)
    assert out["top_p"]["type"] == "InvalidArgument" and out["top_p"]["field"] == "sampling.top_p"
    assert out["top_p"]["details"].startswith("sampling.top_p:")
    assert out["empty_prompt"]["type"] == "InvalidArgument" and out["empty_prompt"]["field"] == "prompt"
    assert out["bad_token_id"]["type"] == "InvalidArgument" and out["bad_token_id"]["field"] == "prompt_token_ids"
    for case in ("no_key", "wrong_key"):
        assert out[case]["type"] == "Unauthenticated" and out[case]["field"] == "authorization", case
    assert out["deadline"]["type"] == "DeadlineExceeded"
    assert out["nobody_listening"]["type"] == "Unavailable"
    assert all(e["is_switchyard_error"] for e in out.values())


def test_retry_policy_retries_before_the_first_token_only(env) -> None:
    out = check(env, "retry")
    # UNAVAILABLE twice, then served: gRPC's retry policy made three attempts, the caller saw one stream.
    assert out["attempts"]["unavailable twice"] == 3
    assert out["retried"]["text"] == "ok!" and out["retried"]["finish_reason"] == "stop"
    # RESOURCE_EXHAUSTED every time: max_attempts (3) tries, then the typed error with the server's hint.
    assert out["attempts"]["tokenize:busy"] == 3
    assert out["exhausted"]["type"] == "ResourceExhausted" and out["exhausted"]["retry_after_s"] == 1.5
    # A failure after a token was delivered is never retried (no token twice).
    assert out["attempts"]["fails after first token"] == 1
    assert out["after_first"]["type"] == "Unavailable" and out["after_first_chunks"] == 1
    assert out["attempts"]["tokenize:once"] == 1 and out["no_retry"]["type"] == "ResourceExhausted"
    # On a plaintext loopback channel the key still goes as call credentials (local credentials).
    assert out["authorization"] == ["", f"Bearer {'sk-local-12345678'}"]


def test_mutual_tls(env, tmp_path) -> None:
    identity = CertificateAuthority(tmp_path, "ours").issue("fake-front-door")
    out = check(env, "tls", tls={"cert_file": identity.cert_file, "key_file": identity.key_file,
                                 "ca_file": identity.ca_file})
    assert out["model_info"] == "fake" and out["authorization"] == ["Bearer sk-tls-12345678"]
    assert out["no_client_cert"]["type"] == "Unavailable" and out["plaintext"]["type"] == "Unavailable"
