"""Which server owns a model: rendezvous hashing of ids over a client's servers.

Every model lives in one server's memory. A client given several servers sends every call for a
model id to the server with the highest weight for that id (highest-random-weight, or
rendezvous, hashing), so all clients agree without talking to each other, and adding or removing
a server moves only the ids it wins or held. Specified byte for byte in docs/interop.md
("Several servers"), with test vectors, so that a client in another language routes the same
way; tests/node/routing.mjs does.

    weight(server, key) = first 8 bytes, big-endian, of SHA-256(server || 0x00 || key)
    owner(key, servers) = the server of highest weight; a tie goes to the first in sorted order

Used by the sync and async clients (gradserve.model, _ops) and the command line, including
`gradserve rebalance` (gradserve.rebalance).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
import socket
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

DNS_SCHEME = "dns:///"
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"{_OCTET}(\.{_OCTET}){{3}}")
_HOST = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")
_CACHE = 65536  # owners remembered per client; cleared when full (recomputing is cheap)


# ------------------------------------------------------------------------------ the function


def normalize(address: str) -> str:
    """The identity of a server address: `host:port`, lower-case, without a trailing dot, an IPv6
    address compressed (RFC 5952) in brackets, the port in decimal. ValueError if malformed."""
    if not address.isascii():
        raise ValueError(f"server {address!r}: not ASCII (write an IDN host in punycode)")
    text = address.strip(" \t\n\r\f\v")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"server {address!r}: expected [IPv6]:port")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"server {address!r}: expected host:port, e.g. {text or 'host'}:50051")
        if ":" in host:
            raise ValueError(f"server {address!r}: an IPv6 address goes in brackets, [{host}]:port")
    if not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"server {address!r}: the port must be a number from 1 to 65535")
    host = host.lower()
    if text.startswith("["):
        try:
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            ip = None
        if ip is None or ip.scope_id is not None:  # a zone (%eth0) names no server elsewhere
            raise ValueError(f"server {address!r}: {host!r} is not an IPv6 address "
                             "(without a zone)")
        return f"[{ip.compressed}]:{int(port)}"
    if not _IPV4.fullmatch(host):
        host = host.removesuffix(".")
        if not _HOST.fullmatch(host):
            raise ValueError(f"server {address!r}: {host!r} is not a host name or an IP "
                             "address")
    return f"{host}:{int(port)}"


def weight(server: str, key: str) -> int:
    """The rendezvous weight of key on server (an identity from normalize)."""
    digest = hashlib.sha256(server.encode() + b"\x00" + key.encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _highest(key: str, servers: Sequence[str]) -> str:
    """The owner among servers: normalized identities in sorted order."""
    best, best_weight = servers[0], -1
    for server in servers:
        w = weight(server, key)
        if w > best_weight:  # strictly greater: a tie stays with the earlier server
            best, best_weight = server, w
    return best


def owner(key: str, servers: Iterable[str]) -> str:
    """The server (its normalized identity) that owns key among servers."""
    identities = sorted({normalize(s) for s in servers})
    if not identities:
        raise ValueError("no servers")
    return _highest(key, identities)


class Router:
    """A client's servers (identities, sorted) and the owner of each key, remembered."""

    def __init__(self, servers: Iterable[str]) -> None:
        self.servers: tuple[str, ...] = tuple(sorted({normalize(s) for s in servers}))
        if not self.servers:
            raise ValueError("no servers")
        self._owners: dict[str, str] = {}

    def owner(self, key: str) -> str:
        found = self._owners.get(key)
        if found is None:
            if len(self._owners) >= _CACHE:
                self._owners.clear()
            found = self._owners[key] = _highest(key, self.servers)
        return found


def new_id(prefix: str) -> str:
    """An id picked by the client, as the server would pick it (`model-<12 hex>`), so that the
    call can be routed before it is sent."""
    return f"{prefix}-{secrets.token_hex(6)}"


# ------------------------------------------------------------------------------ what each call routes by

KEY = "key"      # one server: the owner of the first non-empty of `fields`
EVERY = "every"  # every server, each must answer; the replies are merged
ANY = "any"      # every server; done where the thing exists (NOT_FOUND elsewhere is expected)
OWN = "own"      # not routed: each connection's own (shared-memory segments)


def first(replies: Sequence[Any]) -> Any:
    """The reply of the first server (in sorted order) that gave one."""
    return replies[0]


def union(field: str, key: str, unique: bool = False) -> Callable[[Sequence[Any]], Any]:
    """Merge List* replies: every server's `field` items in one reply, sorted by `key` (stable:
    equal keys in server order); unique=True keeps the first of equal keys."""
    def merge(replies: Sequence[Any]) -> Any:
        items = sorted((item for r in replies for item in getattr(r, field)),
                       key=lambda item: getattr(item, key))
        if unique:
            by_key: dict[str, Any] = {}
            for item in items:
                by_key.setdefault(getattr(item, key), item)
            items = list(by_key.values())
        out = type(replies[0])()
        getattr(out, field).extend(items)
        return out
    return merge


def least_healthy(replies: Sequence[Any]) -> Any:
    """Merge health replies: SERVING only if every server is, else the first one that is not."""
    return next((r for r in replies if r.status != _SERVING), replies[0])


_SERVING = 1  # grpc.health.v1.HealthCheckResponse.SERVING


@dataclass(frozen=True)
class Route:
    kind: str
    fields: tuple[str, ...] = ()
    merge: Callable[[Sequence[Any]], Any] = first


_BY_MODEL = Route(KEY, ("model_id",))

# Every method of GradientService and the health service (tests/test_routing.py checks that the
# table names every one); docs/interop.md has the same table for other languages.
ROUTES: dict[str, Route] = {
    "CreateModel": _BY_MODEL,  # the client picks the id when it is empty
    "GetModel": _BY_MODEL,
    "ListModels": Route(EVERY, merge=union("models", "model_id")),
    "DeleteModel": _BY_MODEL,
    "Forward": _BY_MODEL,
    "Backward": _BY_MODEL,
    "Step": _BY_MODEL,
    "ZeroGrad": _BY_MODEL,
    "GetParameters": _BY_MODEL,
    "SetParameters": _BY_MODEL,
    "Train": _BY_MODEL,
    "TrainStream": Route(KEY, ("config.model_id",)),  # the first message's
    "UploadDataset": Route(EVERY, ("header.dataset_id",)),  # copied to every server
    "ListDatasets": Route(EVERY, merge=union("datasets", "dataset_id", unique=True)),
    "DeleteDataset": Route(ANY, ("dataset_id",)),
    "SaveCheckpoint": _BY_MODEL,  # written where the model is
    "LoadCheckpoint": Route(KEY, ("model_id", "name")),
    "ListCheckpoints": Route(EVERY, merge=union("checkpoints", "name")),
    "DeleteCheckpoint": Route(ANY, ("name",)),
    "RegisterSharedMemory": Route(OWN),
    "UnregisterSharedMemory": Route(OWN),
    "Check": Route(EVERY, merge=least_healthy),  # grpc.health.v1.Health
    "GetServerInfo": Route(EVERY),  # every server must answer; the first one's reply
}


def key_of(route: Route, request: Any) -> str:
    """The routing key of a request: its first non-empty field of route.fields."""
    for path in route.fields:
        value = request
        for name in path.split("."):
            value = getattr(value, name)
        if value:
            return str(value)
    return ""


# ------------------------------------------------------------------------------ servers of a client


@dataclass(frozen=True)
class Endpoint:
    """One server: its identity (what routing hashes) and the gRPC target to connect to."""

    identity: str
    target: str


Resolve = Callable[..., list[Any]]
Reverse = Callable[[Any, int], tuple[str, str]]


def endpoints(address: str | Sequence[str], *, resolve: Resolve = socket.getaddrinfo,
              reverse: Reverse = socket.getnameinfo) -> list[Endpoint]:
    """The servers an address argument names, sorted by identity.

    A string that is not `dns:///...` is one server, kept as given (a client with one server
    behaves as it always did). A list names several (`host:port` each); `dns:///host:port`,
    alone or in a list, stands for every address the name resolves to (see resolve_dns).
    """
    if isinstance(address, str):
        if not address.startswith(DNS_SCHEME):
            return [Endpoint(address, address)]
        found = resolve_dns(address, resolve=resolve, reverse=reverse, alone=True)
        # One server (one address, or several with one name): connect to the name given, as
        # gRPC always did.
        return found if len(found) > 1 else [Endpoint(found[0].identity, address)]
    if not address:
        raise ValueError("servers: the list is empty")
    found_by_id: dict[str, Endpoint] = {}
    for entry in address:
        if not isinstance(entry, str):
            raise TypeError(f"servers: {entry!r} is not a string")
        if entry.startswith(DNS_SCHEME):
            items = resolve_dns(entry, resolve=resolve, reverse=reverse)
        else:
            identity = normalize(entry)
            items = [Endpoint(identity, identity)]
        for item in items:
            found_by_id.setdefault(item.identity, item)
    return sorted(found_by_id.values(), key=lambda e: e.identity)


def resolve_dns(target: str, *, resolve: Resolve = socket.getaddrinfo,
                reverse: Reverse = socket.getnameinfo, alone: bool = False) -> list[Endpoint]:
    """Every server behind `dns:///host:port`: the name's A and AAAA records, each named by its
    reverse (PTR) name when that name resolves back to it, else by the address itself.
    alone: the client's only address argument; a single address is then kept as `target`.

    Pods of a Kubernetes StatefulSet behind a headless Service have such names
    (gradserve-0.gradserve-headless.<namespace>.svc.cluster.local), which outlive their IP
    addresses: a restarted pod keeps its models. Sorted by identity, duplicates merged.
    """
    rest = target.removeprefix(DNS_SCHEME)
    host_port = normalize(rest)  # validates; the port is required
    host, _, port = host_port.rpartition(":")
    host = host.strip("[]")
    try:
        infos = resolve(host, int(port), type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ValueError(f"servers: cannot resolve {target!r}: {exc}") from None
    sockaddrs: dict[str, Any] = {}
    for info in infos:
        sockaddrs.setdefault(str(info[4][0]), info[4])
    if not sockaddrs:
        raise ValueError(f"servers: {target!r} resolves to no address")
    if alone and len(sockaddrs) == 1:
        # The only server: nothing to route, so no name to look up; connect to the name given,
        # as gRPC always did (it resolves it again when it reconnects).
        (ip,) = sockaddrs
        return [Endpoint(normalize(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"), target)]

    def name_of(ip: str) -> str:
        address = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        try:
            name = reverse(sockaddrs[ip], socket.NI_NAMEREQD)[0].lower().removesuffix(".")
            identity = normalize(f"{name}:{port}")
            back = {str(i[4][0]) for i in resolve(name, int(port), type=socket.SOCK_STREAM)}
        except (OSError, ValueError):
            return normalize(address)
        return identity if ip in back else normalize(address)

    with ThreadPoolExecutor(max_workers=min(16, len(sockaddrs))) as pool:
        identities = sorted(set(pool.map(name_of, sockaddrs)))
    return [Endpoint(i, i) for i in identities]
