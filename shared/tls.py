"""TLS and mutual TLS for every listener (gRPC, HTTP, /metrics) and every internal client.

One identity per process: the certificate and key it presents as a server are the ones it presents
as a client to the next hop, and one CA file says whose certificates it trusts. That is how
service meshes and cert-manager issue them (one certificate per workload), and it keeps the
configuration to three paths per service:

- `cert_file` + `key_file` alone: TLS (the server proves who it is; clients are not asked).
- plus `ca_file`: mutual TLS. Servers refuse clients without a certificate signed by that CA;
  clients verify the server against it and present their own certificate.

Nothing set means plaintext, which is safe only because listeners bind to loopback by default.
Certificates are read at start; a missing or unreadable file fails start naming its flag.
"""

from __future__ import annotations

import argparse
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from shared.config import env_str
from shared.errors import InvalidArgument


@dataclass(frozen=True)
class TlsConfig:
    cert_file: str = ""  # PEM certificate chain this process presents
    key_file: str = ""  # PEM private key of cert_file
    ca_file: str = ""  # PEM CA bundle peers must be signed by; set means mutual TLS

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise InvalidArgument("--tls-cert and --tls-key must be given together", field="tls_key")
        if self.ca_file and not self.cert_file:
            raise InvalidArgument("mutual TLS (--tls-ca) needs this service's own --tls-cert and --tls-key",
                                  field="tls_cert")
        for name, path in (("tls_cert", self.cert_file), ("tls_key", self.key_file), ("tls_ca", self.ca_file)):
            if path and not Path(path).is_file():
                raise InvalidArgument(f"{path!r} is not a readable file", field=name)

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)

    @property
    def mutual(self) -> bool:
        return bool(self.ca_file)

    @property
    def scheme(self) -> str:
        return "https" if self.enabled else "http"

    def server_credentials(self) -> grpc.ServerCredentials:
        pair = (_read(self.key_file), _read(self.cert_file))
        if self.mutual:
            return grpc.ssl_server_credentials([pair], root_certificates=_read(self.ca_file),
                                               require_client_auth=True)
        return grpc.ssl_server_credentials([pair])

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """What a client of another Switchyard service presents and trusts."""
        roots = _read(self.ca_file) if self.ca_file else None
        if self.mutual:
            return grpc.ssl_channel_credentials(roots, _read(self.key_file), _read(self.cert_file))
        return grpc.ssl_channel_credentials(roots)

    def uvicorn_options(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        options: dict[str, Any] = {"ssl_certfile": self.cert_file, "ssl_keyfile": self.key_file}
        if self.mutual:
            options.update(ssl_ca_certs=self.ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED)
        return options

    def prometheus_options(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        options: dict[str, Any] = {"certfile": self.cert_file, "keyfile": self.key_file}
        if self.mutual:
            options.update(client_cafile=self.ca_file, client_auth_required=True)
        return options


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """--tls-cert/--tls-key/--tls-ca with SWITCHYARD_TLS_* fallbacks, the same for every service."""
    parser.add_argument("--tls-cert", default=env_str("SWITCHYARD_TLS_CERT", ""),
                        help="PEM certificate for every listener and internal client; unset: plaintext "
                             "[SWITCHYARD_TLS_CERT]")
    parser.add_argument("--tls-key", default=env_str("SWITCHYARD_TLS_KEY", ""),
                        help="PEM private key of --tls-cert [SWITCHYARD_TLS_KEY]")
    parser.add_argument("--tls-ca", default=env_str("SWITCHYARD_TLS_CA", ""),
                        help="PEM CA bundle; set: mutual TLS, peers must present a certificate it signed "
                             "[SWITCHYARD_TLS_CA]")


def tls_from_args(args: argparse.Namespace) -> TlsConfig:
    return TlsConfig(cert_file=args.tls_cert, key_file=args.tls_key, ca_file=args.tls_ca)
