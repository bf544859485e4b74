"""Local stack runner: `python -m deploy.stack up|down|status`, what `make up` / `make down` run.

`up` starts the workers, then the schedulers (a leader and a standby sharing a lease file in the run
dir, so killing the leader loses no request), then the tokenizer, each as a detached process (its own
session, so it outlives `make`) logging to `<run_dir>/logs/<name>.log`, and returns once each reports
SERVING on the gRPC health service. `<run_dir>/pids.json` records what runs, so `down` and `status`
work from any shell. The end-to-end tests call `start_stack` / `stop_stack`: the same code path.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.channel import open_sync_channel
from shared.config import ConfigError, env_float, env_int, env_str
from shared.errors import InvalidArgument
from shared.tls import TlsConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / "models" / "smollm2-135m-instruct"
SERVICES = ("worker", "scheduler", "tokenizer")  # start order; `down` stops in reverse
HEALTH_NAMES = {"worker": "switchyard.worker.v1.Worker", "scheduler": "switchyard.scheduler.v1.Scheduler",
                "tokenizer": "switchyard.api.v1.Generation"}
_PORT_VARS = {  # StackConfig field -> variable; 0 disables a metrics or HTTP port
    "tokenizer_port": "SWITCHYARD_TOKENIZER_PORT", "http_port": "SWITCHYARD_HTTP_PORT",
    "scheduler_port": "SWITCHYARD_SCHEDULER_PORT", "worker_base_port": "SWITCHYARD_WORKER_BASE_PORT",
    "tokenizer_metrics_port": "SWITCHYARD_TOKENIZER_METRICS_PORT",
    "scheduler_metrics_port": "SWITCHYARD_SCHEDULER_METRICS_PORT",
    "standby_scheduler_port": "SWITCHYARD_STANDBY_SCHEDULER_PORT",
    "standby_scheduler_metrics_port": "SWITCHYARD_STANDBY_SCHEDULER_METRICS_PORT",
    "worker_base_metrics_port": "SWITCHYARD_WORKER_BASE_METRICS_PORT",
}
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}  # what this process started, so it can reap them


class StackError(RuntimeError):
    """The stack could not start; `started` lists what it had started (all stopped again)."""

    def __init__(self, message: str, started: tuple[Process, ...] = ()) -> None:
        super().__init__(message)
        self.started = started


class StackRunning(StackError):
    """A stack already runs from this run dir; nothing was started."""


@dataclass(frozen=True)
class StackConfig:
    run_dir: Path = REPO_ROOT / ".run"
    model_dir: Path = DEFAULT_MODEL
    num_workers: int = 2
    host: str = "127.0.0.1"
    tokenizer_port: int = 50051
    http_port: int = 8000
    scheduler_port: int = 50052
    worker_base_port: int = 50061  # worker i (from 0) listens on base + i
    tokenizer_metrics_port: int = 9101
    scheduler_metrics_port: int = 9102
    # 2: a standby takes over when the leader dies (leader election through a lease file); 1: alone.
    num_schedulers: int = 2
    standby_scheduler_port: int = 50053
    standby_scheduler_metrics_port: int = 9103
    lease_duration_s: float = 5.0
    worker_base_metrics_port: int = 9111
    worker_args: tuple[str, ...] = ()
    scheduler_args: tuple[str, ...] = ()
    tokenizer_args: tuple[str, ...] = ()
    # Every process gets it (through SWITCHYARD_TLS_*), and `up`/`status` use it for health checks.
    tls: TlsConfig = TlsConfig()
    grace_s: float = 10.0  # each child's own shutdown grace
    stop_grace_s: float = 15.0  # how long `down` waits before SIGKILL
    timeout_s: float = 120.0  # per tier, until SERVING
    services: tuple[str, ...] = SERVICES

    @classmethod
    def from_env(cls) -> StackConfig:
        """The defaults, overridden by SWITCHYARD_* variables: what `make up` runs."""
        return cls(
            run_dir=Path(env_str("SWITCHYARD_RUN_DIR", str(REPO_ROOT / ".run"))).absolute(),
            model_dir=Path(env_str("SWITCHYARD_MODEL", str(DEFAULT_MODEL))).absolute(),
            num_workers=env_int("SWITCHYARD_WORKERS", 2, min_value=1),
            num_schedulers=env_int("SWITCHYARD_SCHEDULERS", 2, min_value=1, max_value=2),
            worker_args=tuple(shlex.split(env_str("SWITCHYARD_WORKER_ARGS", ""))),
            scheduler_args=tuple(shlex.split(env_str("SWITCHYARD_SCHEDULER_ARGS", ""))),
            tokenizer_args=tuple(shlex.split(env_str("SWITCHYARD_TOKENIZER_ARGS", ""))),
            tls=TlsConfig(env_str("SWITCHYARD_TLS_CERT", ""), env_str("SWITCHYARD_TLS_KEY", ""),
                          env_str("SWITCHYARD_TLS_CA", "")),
            grace_s=env_float("SWITCHYARD_GRACE_S", cls.grace_s, min_value=0),
            timeout_s=env_float("SWITCHYARD_UP_TIMEOUT_S", cls.timeout_s, min_value=1),
            **{name: env_int(var, getattr(cls, name), min_value=0) for name, var in _PORT_VARS.items()},
        )


@dataclass(frozen=True)
class Process:
    name: str  # "worker-1", "scheduler", "scheduler-2" (the standby at start), "tokenizer"
    kind: str  # one of SERVICES
    pid: int
    address: str  # gRPC host:port
    metrics_port: int  # 0: none
    http_port: int  # tokenizer's OpenAI-compatible API; 0: none
    log: str

    def url(self, port: int) -> str:
        return f"http://{self.address.rpartition(':')[0]}:{port}"


@dataclass(frozen=True)
class Stack:
    run_dir: Path
    processes: tuple[Process, ...]

    def addresses(self, kind: str) -> tuple[str, ...]:
        return tuple(p.address for p in self.processes if p.kind == kind)

    @property
    def tokenizer_address(self) -> str | None:
        return next(iter(self.addresses("tokenizer")), None)

    @property
    def scheduler_address(self) -> str | None:
        return next(iter(self.addresses("scheduler")), None)

    @property
    def worker_addresses(self) -> tuple[str, ...]:
        return self.addresses("worker")

    @property
    def http_url(self) -> str | None:
        return next((p.url(p.http_port) for p in self.processes if p.http_port), None)

    @property
    def metrics_urls(self) -> dict[str, str]:
        return {p.name: p.url(p.metrics_port) + "/metrics" for p in self.processes if p.metrics_port}


@dataclass(frozen=True)
class ProcessStatus:
    process: Process
    alive: bool
    health: str  # "SERVING", "NOT_SERVING", ..., "UNREACHABLE", or "DEAD"


def _plan(c: StackConfig) -> list[tuple[Process, tuple[str, ...]]]:
    """Each process to start (pid 0 until spawned) with its command-line flags."""
    def proc(name: str, kind: str, port: int, mport: int, http: int, *flags: str) -> tuple[Process, tuple[str, ...]]:
        common = ("--host", c.host, "--port", str(port), "--metrics-port", str(mport), "--grace-s", str(c.grace_s))
        log = str(Path(c.run_dir) / "logs" / f"{name}.log")
        return Process(name, kind, 0, f"{c.host}:{port}", mport, http, log), (*common, *flags)

    model = ("--model", str(c.model_dir))
    ports = [(c.worker_base_port + i, c.worker_base_metrics_port and c.worker_base_metrics_port + i)
             for i in range(c.num_workers)]
    plans = [proc(f"worker-{i + 1}", "worker", p, m, 0, *model, *c.worker_args) for i, (p, m) in enumerate(ports)]
    workers = ",".join(f"{c.host}:{p}" for p, _ in ports)
    schedulers = [("scheduler", c.scheduler_port, c.scheduler_metrics_port),
                  ("scheduler-2", c.standby_scheduler_port, c.standby_scheduler_metrics_port)][:c.num_schedulers]
    lease = ("--leader-lease", f"file:{Path(c.run_dir) / 'scheduler.lease'}",
             "--lease-duration-s", str(c.lease_duration_s)) if len(schedulers) > 1 else ()
    for name, port, mport in schedulers:
        plans.append(proc(name, "scheduler", port, mport, 0, "--workers", workers, *lease, *c.scheduler_args))
    plans.append(proc("tokenizer", "tokenizer", c.tokenizer_port, c.tokenizer_metrics_port, c.http_port, *model,
                      "--http-host", c.host, "--http-port", str(c.http_port),
                      "--scheduler", ",".join(f"{c.host}:{port}" for _, port, _ in schedulers), *c.tokenizer_args))
    return [(p, flags) for p, flags in plans if p.kind in c.services]


def _check_ports(host: str, processes: list[Process]) -> None:
    """Fails naming the first port that is taken (or configured twice), before anything starts."""
    labelled = [(f"{p.name} {what}", port) for p in processes for what, port in (
        ("gRPC", int(p.address.rpartition(":")[2])), ("metrics", p.metrics_port), ("HTTP", p.http_port)) if port]
    seen: dict[int, str] = {}
    for label, port in labelled:
        if port in seen:
            raise StackError(f"port {port} is configured twice: for {seen[port]} and for {label}")
        seen[port] = label
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT from the last run is fine
            try:
                s.bind((host, port))
            except OSError as e:
                raise StackError(f"port {port} ({label}) on {host} is busy: {e.strerror}; stop what uses it "
                                 f"or choose another port (SWITCHYARD_*_PORT)") from None


def _pids_file(run_dir: Path) -> Path:
    return Path(run_dir) / "pids.json"


def _write_pids(run_dir: Path, processes: list[Process]) -> None:
    tmp = _pids_file(run_dir).with_suffix(".tmp")  # renamed into place: `status` never reads half a file
    tmp.write_text(json.dumps([asdict(p) for p in processes], indent=1))
    tmp.replace(_pids_file(run_dir))


def load_stack(run_dir: Path) -> Stack | None:
    """The stack recorded in `run_dir`, or None."""
    try:
        return Stack(Path(run_dir), tuple(Process(**p) for p in json.loads(_pids_file(run_dir).read_text())))
    except FileNotFoundError:
        return None


def is_alive(pid: int) -> bool:
    if pid in _CHILDREN:
        return _CHILDREN[pid].poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an unreaped zombie is not running, and a reused pid is not ours
        zombie = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
        return not zombie and b"services." in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def check_health(address: str, service: str, timeout_s: float = 1.0, tls: TlsConfig | None = None) -> str:
    """The health status name of `service` at `address`, or "UNREACHABLE"."""
    try:
        with open_sync_channel(address, tls) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError:
        return "UNREACHABLE"


def process_health(p: Process, timeout_s: float = 1.0, tls: TlsConfig | None = None) -> str:
    """Like check_health under the process's service name; a scheduler that stands by (NOT_SERVING
    under the Scheduler's name, SERVING overall) is "STANDBY"."""
    status = check_health(p.address, HEALTH_NAMES[p.kind], timeout_s, tls)
    if p.kind == "scheduler" and status == "NOT_SERVING" and check_health(p.address, "", timeout_s, tls) == "SERVING":
        return "STANDBY"
    return status


def _failure(p: Process, why: str, started: list[Process], num_lines: int = 25) -> StackError:
    try:
        tail = Path(p.log).read_text(errors="replace").splitlines()[-num_lines:]
    except OSError:
        tail = ["(no log)"]
    lines = "\n".join(f"    {line}" for line in tail)
    return StackError(f"{p.name} {why}; last lines of {p.log}:\n{lines}", tuple(started))


def _spawn(p: Process, flags: tuple[str, ...], tls: TlsConfig, log_mode: str = "wb") -> Process:
    path = [str(REPO_ROOT), str(REPO_ROOT / "shared" / "proto"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(filter(None, path))}
    if tls.enabled:
        env.update(SWITCHYARD_TLS_CERT=tls.cert_file, SWITCHYARD_TLS_KEY=tls.key_file, SWITCHYARD_TLS_CA=tls.ca_file)
    with open(p.log, log_mode) as log:  # a new session: neither `make` ending nor a closed terminal stops it
        child = subprocess.Popen([sys.executable, "-m", f"services.{p.kind}", *flags], cwd=REPO_ROOT, env=env,
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    _CHILDREN[child.pid] = child
    return replace(p, pid=child.pid)


def _wait_serving(tier: list[Process], timeout_s: float, started: list[Process], tls: TlsConfig,
                  standby_ok: bool = False) -> None:
    """Until each process of `tier` is SERVING (or, with `standby_ok`, a standby scheduler)."""
    t0 = last_note = time.monotonic()
    pending = list(tier)
    print(f"waiting for {', '.join(p.name for p in tier)} ...", flush=True)
    while pending:
        for p in list(pending):
            if not is_alive(p.pid):
                raise _failure(p, f"exited (code {_CHILDREN[p.pid].returncode}) before serving", started)
            health = process_health(p, timeout_s=0.5, tls=tls)
            if health == "SERVING" or (health == "STANDBY" and standby_ok):
                print(f"  {p.name} {health} on {p.address} after {time.monotonic() - t0:.1f} s", flush=True)
                pending.remove(p)
        if pending and time.monotonic() - t0 > timeout_s:
            raise _failure(pending[0], f"not SERVING after {timeout_s:.0f} s", started)
        if pending and time.monotonic() - last_note >= 10:
            last_note = time.monotonic()
            print(f"  still waiting for {', '.join(p.name for p in pending)} ({last_note - t0:.0f} s)", flush=True)
        time.sleep(0.2 if pending else 0)


def ensure_model(c: StackConfig) -> None:
    """Makes the default model when it is missing; any other directory is the worker's to judge."""
    if Path(c.model_dir).resolve() == DEFAULT_MODEL and not (DEFAULT_MODEL / "config.json").exists():
        print(f"default model {DEFAULT_MODEL} is missing; making it (under a minute) ...", flush=True)
        from services.worker.make_model import make_model  # noqa: PLC0415 (loads torch only when needed)

        make_model("smollm2", DEFAULT_MODEL, cache_dir=DEFAULT_MODEL.parent / ".cache")


def start_stack(config: StackConfig) -> Stack:
    """Starts the configured services tier by tier; returns once all are SERVING, else stops them and raises."""
    run_dir = Path(config.run_dir)
    running = load_stack(run_dir)
    if running and any(is_alive(p.pid) for p in running.processes):
        pids = ", ".join(str(p.pid) for p in running.processes)
        raise StackRunning(f"a stack is already running from {run_dir} (pids {pids}); `make down` stops it")
    plans = _plan(config)
    _check_ports(config.host, [p for p, _ in plans])
    ensure_model(config)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    started: list[Process] = []
    try:
        # Schedulers one at a time: the first leads (SERVING) before the standby starts, so the
        # stack's `scheduler` is the leader after `up`.
        tiers = [[(p, flags) for p, flags in plans if p.kind == kind] for kind in SERVICES if kind != "scheduler"]
        tiers[1:1] = [[(p, flags)] for p, flags in plans if p.kind == "scheduler"]
        for planned in tiers:
            tier = [_spawn(p, flags, config.tls) for p, flags in planned]
            started += tier
            _write_pids(run_dir, started)
            if tier:
                # A standby is ready as such once a scheduler started before it leads (it waited for SERVING).
                others = [p for p in started if p not in tier]
                _wait_serving(tier, config.timeout_s, started, config.tls,
                              standby_ok=any(p.kind == "scheduler" for p in others))
    except BaseException:  # Ctrl-C included: leave nothing half-started behind
        stop_stack(run_dir, grace_s=min(config.stop_grace_s, 5.0), quiet=True)
        raise
    return Stack(run_dir, tuple(started))


def restart_process(config: StackConfig, name: str) -> Process:
    """Starts one process of a running stack again (after it died), with the flags `up` gave it, and
    waits until it is SERVING; the others keep running. Its log is appended to, not replaced."""
    planned = {p.name: (p, flags) for p, flags in _plan(config)}
    if name not in planned:
        raise StackError(f"no process named {name!r} in this stack (have {', '.join(planned)})")
    stack = load_stack(Path(config.run_dir))
    if stack is None:
        raise StackError(f"no stack running from {config.run_dir}")
    old = next((p for p in stack.processes if p.name == name), None)
    if old is not None and is_alive(old.pid):
        raise StackError(f"{name} (pid {old.pid}) is still running")
    process, flags = planned[name]
    new = _spawn(process, flags, config.tls, log_mode="ab")
    _write_pids(Path(config.run_dir), [new if p.name == name else p for p in stack.processes])
    _wait_serving([new], config.timeout_s, [], config.tls, standby_ok=True)  # a scheduler may come back standing by
    return new


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)  # each child leads its own session, so its pid is its process group
    except (ProcessLookupError, PermissionError):
        pass


def stop_stack(run_dir: Path, grace_s: float = 15.0, quiet: bool = False) -> bool:
    """SIGTERM tokenizer, scheduler, then workers within one grace, then SIGKILL; False if no stack was there."""
    stack = load_stack(run_dir)
    if stack is None:
        return False
    say = (lambda _: None) if quiet else (lambda message: print(message, flush=True))
    deadline = time.monotonic() + grace_s
    for kind in reversed(SERVICES):
        tier = [p for p in stack.processes if p.kind == kind and is_alive(p.pid)]
        for p in tier:
            say(f"stopping {p.name} (pid {p.pid})")
            _signal_group(p.pid, signal.SIGTERM)
        while any(is_alive(p.pid) for p in tier) and time.monotonic() < deadline:
            time.sleep(0.1)
    for p in stack.processes:  # leftovers, and whatever a child started in its group
        if is_alive(p.pid):
            say(f"{p.name} (pid {p.pid}) still running after {grace_s:.0f} s; killing it")
        _signal_group(p.pid, signal.SIGKILL)
    reap_deadline = time.monotonic() + 5.0
    for p in stack.processes:
        while is_alive(p.pid) and time.monotonic() < reap_deadline:
            time.sleep(0.05)
        _CHILDREN.pop(p.pid, None)
    _pids_file(run_dir).unlink(missing_ok=True)
    return True


def stack_status(run_dir: Path, tls: TlsConfig | None = None) -> list[ProcessStatus]:
    stack = load_stack(run_dir)
    alive = {p.pid: is_alive(p.pid) for p in (stack.processes if stack else ())}
    return [ProcessStatus(p, alive[p.pid], process_health(p, tls=tls) if alive[p.pid] else "DEAD")
            for p in (stack.processes if stack else ())]


def describe(stack: Stack) -> str:
    lines = [f"  {p.name:<10} pid {p.pid:<7} gRPC {p.address}" for p in stack.processes]
    if stack.tokenizer_address:
        http = f", OpenAI-compatible HTTP {stack.http_url}/v1" if stack.http_url else ""
        lines.append(f"  public API: gRPC {stack.tokenizer_address}{http}")
    lines += [f"  metrics {name}: {url}" for name, url in stack.metrics_urls.items()]
    return "\n".join([*lines, f"  logs: {stack.run_dir / 'logs'}"])


def _up(config: StackConfig) -> int:
    try:
        stack = start_stack(config)
    except StackRunning as e:
        print(e)
        return 0
    except StackError as e:
        stopped = "\neverything it had started is stopped again." if e.started else ""
        print(f"up failed: {e}{stopped}", file=sys.stderr)
        return 1
    print(f"stack up:\n{describe(stack)}")
    return 0


def _status(config: StackConfig) -> int:
    statuses = stack_status(config.run_dir, config.tls)
    for s in statuses:
        state = "alive" if s.alive else "dead"
        print(f"  {s.process.name:<10} pid {s.process.pid:<7} {state:<6} {s.health:<12} {s.process.address}")
    print(f"no stack running in {config.run_dir}" if not statuses else f"run dir {config.run_dir}")
    return 0 if statuses and all(s.health in ("SERVING", "STANDBY") for s in statuses) else 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in ("up", "down", "status"):
        print("usage: python -m deploy.stack up|down|status", file=sys.stderr)
        return 2
    try:
        config = StackConfig.from_env()
    except (ConfigError, InvalidArgument) as e:
        print(f"{args[0]}: {e}", file=sys.stderr)
        return 2
    if args[0] == "up":
        return _up(config)
    if args[0] == "status":
        return _status(config)
    stopped = stop_stack(config.run_dir, config.stop_grace_s)
    print("stack stopped" if stopped else f"no stack running in {config.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
