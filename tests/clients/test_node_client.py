"""The Node.js example client (clients/node) against a real stack started as processes: `npm ci` with
the committed lock, then `generate.js` streams a completion and lists the services by reflection.

The stack runs with mutual TLS and API keys, so the client's secure path is the one exercised: its
certificate and CA from files, the key as call credentials composed onto the TLS channel."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.stack import start_stack, stop_stack
from tests.deploy.test_stack import make_config
from tests.security.certs import CertificateAuthority

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None,
                                 reason="node and npm are not installed: the Node.js client cannot run")]

NODE_DIR = Path(__file__).resolve().parents[2] / "clients" / "node"
API_KEY = "sk-node-7c1e5a9b2d40"
STAMP = NODE_DIR / "node_modules" / ".switchyard-lock-sha256"


def npm_ci() -> None:
    """`npm ci` unless node_modules was installed from this very package-lock.json already."""
    lock = hashlib.sha256((NODE_DIR / "package-lock.json").read_bytes()).hexdigest()
    if STAMP.is_file() and STAMP.read_text() == lock:
        return
    done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    STAMP.write_text(lock)


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory) -> Iterator[tuple[str, list[str]]]:
    """The front door's address, and the TLS flags of a client certificate its CA signed."""
    npm_ci()
    run_dir = tmp_path_factory.mktemp("run")
    (run_dir / "keys").write_text(f"node:{API_KEY}\n")
    ca = CertificateAuthority(tmp_path_factory.mktemp("pki"), "ours")
    service, client = ca.issue("service"), ca.issue("node-client")
    config = make_config(run_dir, tiny_model_dir, services=("worker", "scheduler", "tokenizer"), num_workers=1,
                         tls=service.tls(), tokenizer_args=("--api-keys-file", str(run_dir / "keys")))
    try:
        address = start_stack(config).tokenizer_address
        yield address, ["--address", address, "--ca", client.ca_file, "--cert", client.cert_file, "--key", client.key_file]
    finally:
        stop_stack(config.run_dir, quiet=True)


@pytest.fixture(scope="module")
def tls(stack) -> list[str]:
    return stack[1]


def node(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["node", "generate.js", *args], cwd=NODE_DIR, capture_output=True, text=True, timeout=120)


USAGE = re.compile(r"\[finish_reason=(\w+) prompt_tokens=(\d+) completion_tokens=(\d+) cached_tokens=(\d+)\]\n$")


def test_generate_streams_text_and_usage(tls) -> None:
    done = node(*tls, "--prompt", "def main():", "--max-tokens", "12", "--api-key", API_KEY)
    assert done.returncode == 0, done.stderr
    usage = USAGE.search(done.stdout)
    assert usage, done.stdout
    assert usage.group(1) in ("length", "stop") and int(usage.group(2)) > 0 and 1 <= int(usage.group(3)) <= 12
    assert done.stdout[:usage.start()].strip()  # the streamed text came before the usage line
    chat = node(*tls, "--chat", "--prompt", "Hello there", "--max-tokens", "6", "--api-key", API_KEY)
    assert chat.returncode == 0 and USAGE.search(chat.stdout), chat.stderr


def test_errors_name_the_code_and_field(stack, tls) -> None:
    bad = node(*tls, "--prompt", "", "--api-key", API_KEY)
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "(field prompt)" in bad.stderr
    keyless = node(*tls, "--prompt", "hi")
    assert keyless.returncode == 1 and "UNAUTHENTICATED" in keyless.stderr
    plaintext = node("--address", stack[0], "--prompt", "hi", "--api-key", API_KEY, "--timeout-s", "5")
    assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stderr  # the server wants TLS


def test_reflection_lists_the_public_service(tls) -> None:
    done = node(*tls, "--list-services")
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    assert lines["switchyard.api.v1.Generation"] == "Generate (server streaming), Tokenize, GetModelInfo"
    assert "grpc.health.v1.Health" in lines
