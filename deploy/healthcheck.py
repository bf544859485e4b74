"""gRPC health probe for containers: `python -m deploy.healthcheck [ADDRESS [SERVICE]]`.

Exits 0 iff the gRPC health service at ADDRESS reports SERVICE as SERVING, else 1 (and prints the
status it got: NOT_SERVING, SERVICE_UNKNOWN, UNREACHABLE, ...). SERVICE is a full health name
(`switchyard.worker.v1.Worker`) or a kind (`worker`, `scheduler`, `tokenizer`).

With no arguments (the image's HEALTHCHECK), the kind comes from SWITCHYARD_SERVICE and the address
is 127.0.0.1 at that service's port (SWITCHYARD_<KIND>_PORT, else its default). TLS follows
SWITCHYARD_TLS_CERT / _KEY / _CA, as in the services themselves.
"""

from __future__ import annotations

import argparse
import os
import sys

from deploy.stack import HEALTH_NAMES, check_health
from shared.tls import TlsConfig

DEFAULT_PORTS = {"worker": 50061, "scheduler": 50052, "tokenizer": 50051}
PORT_VARS = {"worker": "SWITCHYARD_WORKER_PORT", "scheduler": "SWITCHYARD_SCHEDULER_PORT",
             "tokenizer": "SWITCHYARD_TOKENIZER_PORT"}


def resolve(address: str | None, service: str | None, env: dict[str, str]) -> tuple[str, str]:
    """The (address, health service name) to probe; raises ValueError when they cannot be known."""
    kind = service if service in HEALTH_NAMES else None
    if service is None:
        kind = env.get("SWITCHYARD_SERVICE", "").strip().lower()
        if kind not in HEALTH_NAMES:
            raise ValueError(f"SWITCHYARD_SERVICE must be one of {', '.join(HEALTH_NAMES)} when no SERVICE "
                             f"is given, got {kind!r}")
    name = HEALTH_NAMES[kind] if kind else str(service)
    if address is None:
        if kind is None:
            raise ValueError("ADDRESS is required with a full service name")
        address = f"127.0.0.1:{env.get(PORT_VARS[kind], '') or DEFAULT_PORTS[kind]}"
    return address, name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.healthcheck", description=__doc__.splitlines()[0])
    p.add_argument("address", nargs="?", help="host:port of the gRPC server (default 127.0.0.1:<port>)")
    p.add_argument("service", nargs="?", help="health service name or kind (default SWITCHYARD_SERVICE)")
    p.add_argument("--timeout-s", type=float, default=3.0)
    a = p.parse_args(argv)
    try:
        address, name = resolve(a.address, a.service, dict(os.environ))
        tls = TlsConfig(os.environ.get("SWITCHYARD_TLS_CERT", ""), os.environ.get("SWITCHYARD_TLS_KEY", ""),
                        os.environ.get("SWITCHYARD_TLS_CA", ""))
    except Exception as e:  # noqa: BLE001 - a probe reports, it never raises
        print(f"healthcheck: {e}", file=sys.stderr)
        return 1
    status = check_health(address, name, timeout_s=a.timeout_s, tls=tls if tls.enabled else None)
    print(f"{name} at {address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
