"""Health probe for container HEALTHCHECKs and scripts: exit 0 when the server is SERVING, else 1.

    python -m gradserve.probe [--address 127.0.0.1:50051] [--timeout 3] [--service NAME]
                              [--liveness] [--root-certificates PEM]
                              [--client-cert PEM --client-key PEM]

--liveness asks only whether the process answers: any health status passes (NOT_SERVING too, as
while it drains); no answer within the timeout fails. Kubernetes' liveness probe uses it, so a
busy or draining server is not restarted, a wedged one is.

The default port follows GRADSERVE_PORT, so the probe inside the image checks the port the server
in the same container binds.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

from .client import Client
from .errors import GradServeError


def default_address(environ: Mapping[str, str]) -> str:
    return f"127.0.0.1:{environ.get('GRADSERVE_PORT') or '50051'}"


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gradserve.probe",
        description="Ask a gradserve server's gRPC health service; exit 0 when SERVING, else 1.")
    parser.add_argument("--address", default=default_address(environ),
                        help="host:port of the server (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=3.0,
                        help="seconds to wait for the answer (default: %(default)s)")
    parser.add_argument("--service", default="",
                        help="health service name ('' = the whole server, the default)")
    parser.add_argument("--liveness", action="store_true",
                        help="exit 0 on any answer (NOT_SERVING too): the process is alive")
    parser.add_argument("--root-certificates", metavar="PEM",
                        help="CA bundle that verifies a TLS server (enables TLS)")
    parser.add_argument("--client-cert", metavar="PEM", help="client certificate (mutual TLS)")
    parser.add_argument("--client-key", metavar="PEM", help="client private key (mutual TLS)")
    return parser


# Statuses that mean nothing answered: no connection, no TLS handshake, or no reply in time.
_NO_ANSWER = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def probe(address: str, timeout: float, service: str = "", liveness: bool = False,
          root_certificates: str | None = None, client_cert: str | None = None,
          client_key: str | None = None) -> tuple[bool, str]:
    """(healthy, one-line message) for the server at address."""
    with Client(address, timeout=timeout, retries=0, root_certificates=root_certificates,
                client_cert=client_cert, client_key=client_key) as client:
        try:
            status = client.health(service, timeout=timeout)
        except GradServeError as exc:
            if liveness and exc.code.name not in _NO_ANSWER:
                return True, f"{address}: alive (answered {exc.code.name})"
            return False, f"{address}: no health answer within {timeout:g} s ({exc})"
    if liveness:
        return True, f"{address}: alive ({status})"
    if status == "SERVING":
        return True, f"{address}: SERVING"
    return False, f"{address}: {status} (expected SERVING)"


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = build_parser(os.environ if environ is None else environ).parse_args(argv)
    if args.timeout <= 0:
        print("--timeout must be > 0 seconds", file=sys.stderr)
        return 2
    healthy, message = probe(args.address, args.timeout, args.service, args.liveness,
                             args.root_certificates, args.client_cert, args.client_key)
    print(message, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
