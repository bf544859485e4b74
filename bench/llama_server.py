"""llama.cpp's `llama-server` as a benchmark peer: started on a free loopback port with a GGUF of our
model, `-t <cores> -np <concurrency>`, driven by the same OpenAI HTTP client as our stack
(`bench.clients.run_http`: token-id prompts, greedy, ignore_eos, streamed with usage), stopped after.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from bench.llama_tools import server_binary

START_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_server(gguf: Path, *, num_threads: int, num_parallel: int, ctx_per_slot: int) -> Iterator[str]:
    """The base URL of a running llama-server; the process is stopped (and waited for) on exit.

    Each of the `num_parallel` slots gets `ctx_per_slot` tokens of context (`-c` is the total);
    continuous batching is llama-server's default.
    """
    port = _free_port()
    cmd = [str(server_binary()), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "-t", str(num_threads), "-tb", str(num_threads), "-np", str(num_parallel),
           "-c", str(num_parallel * ctx_per_slot), "--no-webui"]
    with tempfile.TemporaryFile() as log:
        print(f"  starting llama-server {gguf.name} -t {num_threads} -np {num_parallel}", flush=True)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"llama-server exited {proc.returncode}: {log.read()[-800:].decode(errors='replace')}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"llama-server not healthy after {START_TIMEOUT_S:.0f} s")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
