"""The processes of a tensor-parallel worker: rank 0 starts, joins and watches the others.

Rank 0 is `python -m services.worker` as started by the user; it starts each follower as the same
command with `--parallel-rank r --parallel-port P` (the environment is inherited, so
flags given as SWITCHYARD_* variables carry over too). A follower serves nothing: it joins the
process group, loads its shard and replays rank 0's messages (parallel.follow).

Failure is all or nothing. A follower that exits, at start-up or later, makes rank 0 exit at once
with the reason: its collectives could never complete again, and a worker that stops answering is
what the scheduler already handles (its requests move to another worker). A follower dies with its
rank 0 (the kernel's parent-death signal, and the closed connection of its next receive).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from services.worker.parallel import EXIT_RANK_LOST, exit_rank_lost, shard_spec, stage_layers


_PR_SET_PDEATHSIG = 1


def check_split(model_dir: str, tensor_parallel_size: int, pipeline_parallel_size: int) -> None:
    """Refuses, before any process starts, a model whose heads, MLP or layers cannot be split that
    way (ValueError naming the numbers). GGUF files are checked when loaded."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.exists():
        return
    raw = json.loads(config_path.read_text())
    text = raw.get("text_config", raw)
    num_heads = int(text["num_attention_heads"])
    shard_spec(0, tensor_parallel_size, num_heads, int(text.get("num_key_value_heads") or num_heads),
               int(text["intermediate_size"]))
    stage_layers(int(text["num_hidden_layers"]), pipeline_parallel_size, 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_followers(world_size: int, port: int, argv: list[str] | None = None) -> list[subprocess.Popen]:
    """Ranks 1..N-1, as the same command as this process plus their rank and the group's port."""
    args = sys.argv[1:] if argv is None else argv
    return [
        subprocess.Popen([sys.executable, "-m", "services.worker", *args, "--parallel-rank", str(rank),
                          "--parallel-port", str(port)])
        for rank in range(1, world_size)
    ]


def watch_followers(followers: list[subprocess.Popen], poll_interval_s: float = 0.2) -> threading.Thread:
    """Exits this process (rank 0) as soon as any follower has exited."""

    def run() -> None:
        while True:
            for rank, process in enumerate(followers, start=1):
                code = process.poll()
                if code is not None:
                    for other in followers:
                        if other.poll() is None:
                            other.kill()
                    exit_rank_lost(f"rank {rank} (pid {process.pid}) exited with {code}; the worker cannot "
                                   "compute without it and stops")
            time.sleep(poll_interval_s)

    thread = threading.Thread(target=run, name="rank-watch", daemon=True)
    thread.start()
    return thread


def stop_followers(followers: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    for process in followers:
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()


def die_with_parent() -> None:
    """Linux: this follower gets SIGKILL when rank 0 dies, even by kill -9."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the closed connection still ends it at its next receive
        pass
    if os.getppid() == 1:  # the parent died before the signal was armed
        os._exit(EXIT_RANK_LOST)
