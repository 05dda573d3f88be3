"""Replicas found by DNS: a stage address that names many replicas, re-resolved while the orchestrator runs.

A stage's address (its ``--*-address`` flag or a placement entry) may be a DNS target,
``dns:///HOST:PORT`` (gRPC's own naming syntax): every address HOST resolves to (A and AAAA records,
through the system resolver, ``getaddrinfo``) is one replica of the stage at PORT, with the entry's device
label and encoders. On Kubernetes HOST is a headless Service (``clusterIP: None``), whose name resolves to the
IPs of its ready pods, so scaling a Deployment adds and removes replicas with no edit to a placement file.

``DnsDiscovery`` keeps a ``ReplicaPool``'s share of replicas in step with the names: it resolves them when the
orchestrator starts, every ``--discovery-interval-s`` (10 s) after that, and soon (at most once a
second) after a replica of the pool failed or a job found none healthy. An address that appears becomes a
replica (channel and health stream, as a placed one); one that disappears leaves the rotation at once: jobs
that use it keep their channel until they end or fail over (the channel closes when the last of them lets it
go). A name that does not exist (NXDOMAIN: a headless Service without ready pods) means no replicas; any other
resolver failure (a DNS server timing out) keeps the replicas of the last answer.

With TLS, discovered replicas are dialled by IP, which no certificate names, so their certificates are
verified against HOST (gRPC's ``ssl_target_name_override``): the stage's certificate must list the headless
Service's name (infra/k8s/components/tls does).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import re
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # placement.py imports this module; the pool and its specs are only typed here
    from .placement import ReplicaPool, ReplicaSpec

log = logging.getLogger(__name__)

#: Scheme of a stage address resolved to many replicas: ``dns:///HOST:PORT`` (also ``dns:HOST:PORT``).
DNS_SCHEME = "dns:"
#: Default seconds between two resolutions of a DNS target (``--discovery-interval-s``).
DEFAULT_DISCOVERY_INTERVAL_S = 10.0
#: Fewest seconds between two resolutions of one target, however often failures ask for one.
MIN_RESOLVE_INTERVAL_S = 1.0
#: Stages whose replicas may come from DNS. A ControlNet replica is also named to the denoisers, which accept
#: only the addresses they were started with (--controlnet-address), so a pod IP found here would be refused.
DISCOVERABLE_STAGES = ("text_encoder", "denoiser", "vae")

_HOST_PORT = re.compile(r"^(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.\-]+)):(?P<port>\d{1,5})$")
#: getaddrinfo errors that mean "this name has no addresses" (rather than "the resolver failed").
_NO_SUCH_NAME = {getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, name)}


@dataclass(frozen=True)
class DnsTarget:
    """A parsed ``dns:///HOST:PORT``: the name to resolve and the port every replica listens on."""

    host: str
    port: int

    @property
    def address(self) -> str:
        """The canonical spelling, ``dns:///HOST:PORT``."""
        return f"dns:///[{self.host}]:{self.port}" if ":" in self.host else f"dns:///{self.host}:{self.port}"


def is_dns_target(address: str) -> bool:
    """Whether ``address`` is a DNS target (``dns:...``) rather than one replica's HOST:PORT."""
    return address.strip().lower().startswith(DNS_SCHEME)


def parse_dns_target(address: str) -> DnsTarget:
    """``dns:///HOST:PORT`` or ``dns:HOST:PORT`` -> DnsTarget; ValueError saying what to fix (a DNS server in
    the authority, ``dns://8.8.8.8/...``, is not supported: the system resolver is used)."""
    text = address.strip()
    if not is_dns_target(text):
        raise ValueError(f"{address!r} is not a DNS target; write dns:///HOST:PORT")
    rest = text[len(DNS_SCHEME):]
    if rest.startswith("//"):
        authority, slash, rest = rest[2:].partition("/")
        if authority or not slash:
            raise ValueError(f"{address!r}: a DNS server in the target is not supported (the system resolver is "
                             "used); write dns:///HOST:PORT")
    match = _HOST_PORT.match(rest)
    if not match:
        raise ValueError(f"{address!r}: write dns:///HOST:PORT (the port every replica listens on is required)")
    port = int(match["port"])
    if not 0 < port < 65536:
        raise ValueError(f"{address!r}: port {port} is not between 1 and 65535")
    return DnsTarget(match["ipv6"] or match["host"], port)


def format_address(ip: str, port: int) -> str:
    """HOST:PORT of one resolved replica: ``10.0.0.5:50053``, ``[fd00::5]:50053``."""
    return f"[{ip}]:{port}" if ipaddress.ip_address(ip).version == 6 else f"{ip}:{port}"


def replica_security(server_name: str):
    """This service's channel security (services/runtime/security.py) with certificates verified against
    ``server_name``: for a replica dialled by an IP that DNS gave for that name. Plaintext stays plaintext."""
    from services.runtime.security import default_channel_security

    security = default_channel_security()
    return dataclasses.replace(security, server_name=server_name) if security.tls else security


async def resolve(target: DnsTarget) -> list[str]:
    """Every address ``target``'s host resolves to now, as replica addresses (sorted, no duplicates); [] when the
    name does not exist. Other resolver failures raise ``socket.gaierror``."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except socket.gaierror as error:
        if error.errno in _NO_SUCH_NAME:
            return []
        raise
    addresses = {format_address(info[4][0].split("%", 1)[0], target.port) for info in infos
                 if info[0] in (socket.AF_INET, socket.AF_INET6)}
    return sorted(addresses)


@dataclass
class _Source:
    """One DNS entry of a stage: the configured spec, its target and what its last resolution found."""

    spec: ReplicaSpec
    target: DnsTarget
    #: Replica address -> the pool's replica, for the addresses of the last good answer.
    replicas: dict
    #: "3 address(es)", "no addresses (...)", "resolver failed (...)": for error messages.
    state: str = "not resolved yet"
    #: Addresses of the last answer that another entry of the stage holds already (warned about once).
    shadowed: set = field(default_factory=set)


class DnsDiscovery:
    """Keeps the replicas a pool's DNS entries name in the pool: resolves, adds, removes (see the module doc)."""

    def __init__(self, pool: ReplicaPool, specs: tuple[ReplicaSpec, ...], interval_s: float):
        self.pool = pool
        self.interval_s = interval_s
        self.sources = [_Source(spec, parse_dns_target(spec.address), {}) for spec in specs]
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Resolve now and keep resolving (inside the event loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"dns discovery {self.pool.stage}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def refresh_soon(self) -> None:
        """Resolve again without waiting for the interval (a replica failed, or a job found none healthy)."""
        self._wake.set()

    def describe(self) -> str:
        """What each DNS entry last resolved to, for error messages."""
        return "; ".join(f"{source.target.address} [{source.spec.device}]: {source.state}" for source in self.sources)

    async def refresh(self) -> None:
        """Resolve every name once and bring the pool's replicas in line with the answers."""
        for source in self.sources:
            try:
                addresses = await resolve(source.target)
            except (socket.gaierror, UnicodeError) as error:
                # A resolver that failed says nothing about the replicas: keep those of the last answer.
                source.state = f"resolver failed ({getattr(error, 'strerror', None) or error}); keeping " \
                               f"{len(source.replicas)} replica(s) of the last answer"
                log.warning("%s replicas: resolving %s failed: %s", self.pool.stage, source.target.address, error)
                continue
            self._apply(source, addresses)

    def _apply(self, source: _Source, addresses: list[str]) -> None:
        from .placement import ReplicaSpec

        source.state = (f"{len(addresses)} address(es)" if addresses
                        else "no addresses (the name does not exist or has no records)")
        for address in [a for a in source.replicas if a not in addresses]:
            log.info("%s replica %s left %s: out of the rotation", self.pool.stage, address, source.target.address)
            self.pool.remove_replica(source.replicas.pop(address))
        taken = {replica.address for replica in self.pool.replicas}
        shadowed = set()
        for address in addresses:
            if address in source.replicas:
                continue
            if address in taken:  # placed explicitly, or named by another DNS entry of the stage: keep that one
                if address not in source.shadowed:
                    log.warning("%s replica %s from %s is placed already; not added twice", self.pool.stage, address,
                                source.target.address)
                shadowed.add(address)
                continue
            log.info("%s replica %s joined from %s", self.pool.stage, address, source.target.address)
            spec = ReplicaSpec(address, source.spec.device, source.spec.encoders)
            source.replicas[address] = self.pool.add_replica(spec, server_name=source.target.host)
        source.shadowed = shadowed

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()  # a failure reported from here on asks for the next resolution
            started = loop.time()
            try:
                await self.refresh()
            except Exception:  # a bug here must not end discovery for the orchestrator's life
                log.exception("%s replicas: DNS discovery failed; retrying", self.pool.stage)
            # Failures may ask for a resolution at any rate; at most one a MIN_RESOLVE_INTERVAL_S.
            await asyncio.sleep(max(0.0, MIN_RESOLVE_INTERVAL_S - (loop.time() - started)))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, self.interval_s - (loop.time() - started)))
