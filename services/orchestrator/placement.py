"""Placement: where each stage runs, which of its replicas are healthy, and which one a job uses.

Each stage (text_encoder, denoiser, vae, controlnet) has one or more replicas, each an address
on any host with a device label ("gpu-a", "cpu", ...). They come from ``--placement FILE`` or,
without one, from the ``--*-address`` flags (one replica each, device label "default").

A ``ReplicaPool`` per stage holds one grpc.aio channel per replica and keeps a
grpc.health.v1 ``Health/Watch`` stream open on each (no polling): a replica is picked only while
it reports SERVING. Picks go round robin over the healthy replicas, restricted to a device label
when the request pins the stage (``GenerateRequest.stage_devices``). A replica whose call failed
is marked down at once and its health stream re-opened, so it returns to the rotation only once
it answers SERVING again; a job waits up to ``--replica-wait-s`` for a healthy replica before it
fails with UNAVAILABLE.

A text-encoder replica may host only some of a model's encoders (its ``--encoders``; placement entry
``encoders: [text_encoder_3]``, absent: all). Each encoder of a multi-encoder model then runs on a
replica hosting it, as few replicas as the pins allow (``assign_encoders``); a pin
"text_encoder/ENCODER" places one encoder apart from the "text_encoder" pin, and a "refiner" pin places
an SDXL refiner's run on denoiser replicas of that label.

An address may also be a DNS target, ``dns:///HOST:PORT``, that stands for every address HOST resolves to
(a Kubernetes headless Service): discovery.py resolves it periodically and adds and removes the pool's
replicas as the answers change.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from latentwire.common.v1 import status_pb2, status_pb2_grpc
from latentwire.controlnet.v1 import controlnet_pb2
from latentwire.denoiser.v1 import denoiser_pb2
from services.runtime.config import ADDRESS_PATTERN
from services.runtime.errors import InvalidArgument, Unavailable, quote
from services.runtime.families import TEXT_ENCODER_COMPONENTS

from .discovery import DEFAULT_DISCOVERY_INTERVAL_S, DISCOVERABLE_STAGES, DnsDiscovery, is_dns_target, parse_dns_target
from latentwire.text_encoder.v1 import text_encoder_pb2
from latentwire.vae.v1 import vae_pb2

log = logging.getLogger(__name__)

#: The stages a placement file places, with the gRPC service each replica must serve (its health name).
STAGE_SERVICES = {
    "text_encoder": text_encoder_pb2.DESCRIPTOR.services_by_name["TextEncoderService"].full_name,
    "denoiser": denoiser_pb2.DESCRIPTOR.services_by_name["DenoiserService"].full_name,
    "vae": vae_pb2.DESCRIPTOR.services_by_name["VaeService"].full_name,
    "controlnet": controlnet_pb2.DESCRIPTOR.services_by_name["ControlNetService"].full_name,
}
#: Stages every generation needs; the ControlNet stage is optional.
REQUIRED_STAGES = ("text_encoder", "denoiser", "vae")
#: Device label of a replica that names none (and of the replicas the --*-address flags define).
DEFAULT_DEVICE = "default"
#: Pin of the denoiser replica that runs an SDXL refiner (default: any denoiser replica).
REFINER_STAGE = "refiner"
#: Prefix of a pin (and of a job's stage key) for one text encoder of a model: "text_encoder/text_encoder_3".
ENCODER_STAGE_PREFIX = "text_encoder/"

#: Channel arguments for replica channels. A replica that comes back is reconnected within 2 s (grpc's own
#: backoff grows to 120 s). Keepalive pings go on during a long Denoise stream in which the orchestrator
#: sends no data after its request (grpc's default allows 2 pings without data sent, which could hold
#: them back; a cut link would then go unnoticed).
REPLICA_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 1000),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass(frozen=True)
class ReplicaSpec:
    """One replica as configured: its address, its device label and, for a text-encoder replica, the encoders
    it hosts (its --encoders; empty: every encoder of a model)."""

    address: str
    device: str = DEFAULT_DEVICE
    encoders: tuple[str, ...] = ()
    #: For a DNS target (``dns:///HOST:PORT``, discovery.py): seconds between two resolutions of HOST.
    discovery_interval_s: float = DEFAULT_DISCOVERY_INTERVAL_S

    def hosts(self, encoder: str) -> bool:
        """Whether this replica runs ``encoder`` ("text_encoder_2", ...) of a model, as configured."""
        return not self.encoders or encoder in self.encoders


def pool_of(stage: str) -> str:
    """The stage whose replicas a job's stage key runs on: "refiner" -> "denoiser",
    "text_encoder/text_encoder_2" -> "text_encoder"; a stage name is its own."""
    if stage == REFINER_STAGE:
        return "denoiser"
    return stage.split("/", 1)[0]


def encoder_of(stage: str) -> str:
    """The text encoder a stage key names ("text_encoder/text_encoder_2" -> "text_encoder_2"), else ""."""
    return stage[len(ENCODER_STAGE_PREFIX):] if stage.startswith(ENCODER_STAGE_PREFIX) else ""


def pin_of(pins: Mapping[str, str], stage: str) -> str:
    """The device label a job's stage key must run on: its own pin, else (for one text encoder) the
    "text_encoder" pin; "" for any."""
    return pins.get(stage) or (pins.get("text_encoder", "") if encoder_of(stage) else "")


Placement = Mapping[str, tuple[ReplicaSpec, ...]]


def load_placement_file(path: str | Path) -> dict[str, tuple[ReplicaSpec, ...]]:
    """Read a placement file (YAML, so JSON too): a mapping of stage name to a list of replicas, each
    ``{address: HOST:PORT, device: LABEL}`` or a bare ``HOST:PORT``. Raises ValueError saying what is wrong."""
    import yaml

    path = Path(path).expanduser()
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ValueError(f"cannot read the placement file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"the placement file {path} is not valid YAML: {error}") from None
    if not isinstance(document, dict):
        raise ValueError(f"the placement file {path} must map stage names ({', '.join(STAGE_SERVICES)}) to lists "
                         "of replicas")
    placement = {}
    for stage, entries in document.items():
        where = f"{path}: {stage}"
        if stage not in STAGE_SERVICES:
            raise ValueError(f"{where}: unknown stage; use {', '.join(STAGE_SERVICES)}")
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{where}: give a non-empty list of replicas ({{address: HOST:PORT, device: LABEL}})")
        replicas = []
        for index, entry in enumerate(entries):
            if isinstance(entry, str):
                entry = {"address": entry}
            keys = {"address", "device", *(("encoders",) if stage == "text_encoder" else ())}
            if not isinstance(entry, dict) or set(entry) - keys:
                raise ValueError(f"{where}[{index}]: a replica is {{address: HOST:PORT, device: LABEL}}"
                                 + (" (text_encoder: also encoders: [NAME, ...])" if stage == "text_encoder" else "")
                                 + f"; got {entry!r}")
            address, device = str(entry.get("address", "")).strip(), str(entry.get("device", DEFAULT_DEVICE)).strip()
            encoders = _encoders_entry(entry.get("encoders"), f"{where}[{index}]")
            if is_dns_target(address):
                address = _dns_address(stage, address, f"{where}[{index}]")
            elif not ADDRESS_PATTERN.match(address):
                raise ValueError(f"{where}[{index}]: address {address!r} is not HOST:PORT (or dns:///HOST:PORT)")
            if not device:
                raise ValueError(f"{where}[{index}]: device label is empty; leave it out for {DEFAULT_DEVICE!r}")
            if any(r.address == address for r in replicas):
                raise ValueError(f"{where}: address {address} is listed twice")
            replicas.append(ReplicaSpec(address, device, encoders))
        placement[stage] = tuple(replicas)
    return placement


def _encoders_entry(value, where: str) -> tuple[str, ...]:
    """A text-encoder replica's ``encoders`` entry: absent (every encoder) or a non-empty list of component names."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",")]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: encoders is a non-empty list of {', '.join(TEXT_ENCODER_COMPONENTS)}; leave it "
                         "out for a replica that hosts every encoder")
    unknown = [str(name) for name in value if name not in TEXT_ENCODER_COMPONENTS]
    if unknown:
        raise ValueError(f"{where}: unknown encoder {unknown[0]!r}; use {', '.join(TEXT_ENCODER_COMPONENTS)}")
    return tuple(dict.fromkeys(value))


def _dns_address(stage: str, address: str, where: str) -> str:
    """A DNS target's canonical spelling; ValueError when it is malformed or the stage cannot be discovered."""
    if stage not in DISCOVERABLE_STAGES:
        raise ValueError(f"{where}: {stage} replicas cannot come from DNS (the denoisers accept only the ControlNet "
                         "addresses they were started with); give HOST:PORT, e.g. a Service's name")
    try:
        return parse_dns_target(address).address
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def resolve_placement(extra) -> dict[str, tuple[ReplicaSpec, ...]]:
    """The replicas of every stage: the placement file's (``--placement``) where it lists a stage, else the
    stage's ``--*-address`` flag as one replica with device label "default" (a ``dns:///HOST:PORT`` flag: every
    address HOST resolves to). DNS targets get ``--discovery-interval-s``. Raises ValueError."""
    placement = load_placement_file(extra.placement) if getattr(extra, "placement", None) else {}
    for stage in STAGE_SERVICES:
        address = getattr(extra, f"{stage}_address", None)
        if stage not in placement and address:
            if is_dns_target(address):
                address = _dns_address(stage, address, f"--{stage.replace('_', '-')}-address")
            placement[stage] = (ReplicaSpec(address),)
    interval = getattr(extra, "discovery_interval_s", None)
    if interval is not None:
        placement = {stage: tuple(dataclasses.replace(spec, discovery_interval_s=interval)
                                  if is_dns_target(spec.address) else spec for spec in specs)
                     for stage, specs in placement.items()}
    missing = [stage for stage in REQUIRED_STAGES if stage not in placement]
    if missing:
        flags = ", ".join(f"--{stage.replace('_', '-')}-address" for stage in missing)
        raise ValueError(f"the orchestrator needs every stage's address; missing: {flags} (or the "
                         "LATENTWIRE_..._ADDRESS environment variables, or these stages in --placement)")
    return placement


#: Stage names a pin may use beyond the placed stages: the refiner's denoiser and each text encoder.
PIN_STAGES = (*STAGE_SERVICES, REFINER_STAGE, *(ENCODER_STAGE_PREFIX + name for name in TEXT_ENCODER_COMPONENTS))


def check_pins(placement: Placement, stage_devices: Mapping[str, str]) -> None:
    """Refuse, before any work, a pin naming an unknown stage or a device label no replica of it has (for
    "text_encoder/ENCODER": no replica hosting that encoder)."""
    for stage, device in stage_devices.items():
        if stage not in PIN_STAGES:
            raise InvalidArgument(f"stage_devices names stage {quote(stage)}; use {', '.join(PIN_STAGES)}",
                                  reason="UNKNOWN_STAGE", metadata={"field": "stage_devices", "stage": stage[:64]})
        encoder = encoder_of(stage)
        labels = sorted({replica.device for replica in placement.get(pool_of(stage), ())
                         if not encoder or replica.hosts(encoder)})
        if device not in labels:
            known = f"its device labels are {', '.join(labels)}" if labels else "it has no replicas here"
            raise InvalidArgument(f"stage_devices pins {stage} to device {device!r}, but {known}",
                                  reason="UNKNOWN_DEVICE", metadata={"field": "stage_devices", "stage": stage,
                                                                      "device": device})


class Replica:
    """One replica of a stage: its channel and what its health stream last said."""

    def __init__(self, stage: str, spec: ReplicaSpec, channel: grpc.aio.Channel):
        self.stage = stage
        self.address = spec.address
        self.device = spec.device
        self.spec = spec
        self.channel = channel
        self.serving = False
        #: What the orchestrator knows of it, for error messages: SERVING, NOT_SERVING, UNREACHABLE, ...
        self.state = "UNKNOWN"
        #: Jobs it runs at once (GetStatus max_concurrent_jobs, read when it turns SERVING); 0: not known yet.
        self.capacity = 0
        #: Models a LoadModel here answered READY for, or a job that succeeded here ran, with when
        #: (time.monotonic()): a job within LOADED_MEMO_S of that skips its LoadModel round
        #: (execution.load_model_on_stages). Cleared whenever the replica's health changes (a restart forgets its
        #: models).
        self.loaded: dict[str, float] = {}

    def hosts(self, encoder: str) -> bool:
        """Whether this (text-encoder) replica runs ``encoder`` of a model, as the placement says ("": any)."""
        return not encoder or self.spec.hosts(encoder)

    def __repr__(self) -> str:
        return f"{self.stage} replica {self.address} [{self.device}]"


def assign_encoders(encoders, replicas, pins: Mapping[str, str], *, prefer=()) -> tuple[dict, list[str]]:
    """Which replica runs each of a model's text ``encoders``: as few replicas (so Encode calls) as the pins and
    what each replica hosts allow.

    ``replicas`` are the candidates in the order to try them (round robin: the pool's rotation, healthy ones
    only); each has ``device`` and ``hosts(encoder)``. An encoder runs on a replica with its pin's device label
    ("text_encoder/ENCODER", else "text_encoder"). Greedy set cover: the replica that runs the most of the
    encoders still unassigned goes first; on a tie one in ``prefer`` (replicas the job uses already), then the
    earlier one. Returns ({encoder: replica}, [encoders no candidate runs]).
    """
    candidates = {
        encoder: [r for r in replicas if r.hosts(encoder)
                  and (not (pin := pin_of(pins, ENCODER_STAGE_PREFIX + encoder)) or r.device == pin)]
        for encoder in encoders
    }
    unplaced = [encoder for encoder, found in candidates.items() if not found]
    remaining = [encoder for encoder in encoders if candidates[encoder]]
    chosen: dict = {}
    while remaining:
        order = {id(r): i for i, r in enumerate(replicas)}

        def score(replica):
            covered = sum(replica in candidates[e] for e in remaining)
            return (-covered, replica not in prefer, order[id(replica)])

        best = min({id(r): r for e in remaining for r in candidates[e]}.values(), key=score)
        for encoder in [e for e in remaining if best in candidates[e]]:
            chosen[encoder] = best
            remaining.remove(encoder)
    return chosen, unplaced


class ReplicaPool:
    """The replicas of one stage: health watched over streams, picked round robin among the healthy."""

    def __init__(self, stage: str, specs: tuple[ReplicaSpec, ...], channel_factory: Callable[[str], grpc.aio.Channel],
                 *, wait_s: float = 10.0):
        self.stage = stage
        self.service = STAGE_SERVICES[stage]
        self._channel_factory = channel_factory
        self.replicas = [Replica(stage, spec, channel_factory(spec.address)) for spec in specs
                         if not is_dns_target(spec.address)]
        self.wait_s = wait_s
        self._cursor = 0
        self._watches: dict[Replica, asyncio.Task] = {}
        self._changed = asyncio.Event()
        self._started = False
        #: Called when the pool's capacity may have changed (a replica came up, went down, reported its capacity).
        self.on_capacity: Callable[[], None] | None = None
        self._capacity_reads: set[asyncio.Task] = set()
        #: The DNS targets among ``specs``, resolved into replicas of this pool while it runs (discovery.py).
        dns = tuple(spec for spec in specs if is_dns_target(spec.address))
        self.discovery = DnsDiscovery(self, dns, min(spec.discovery_interval_s for spec in dns)) if dns else None

    @property
    def devices(self) -> set[str]:
        """Device labels of the configured replicas (DNS entries included, whatever they resolve to now)."""
        labels = {replica.device for replica in self.replicas}
        return labels | {source.spec.device for source in self.discovery.sources} if self.discovery else labels

    def start(self) -> None:
        """Open a health stream to every replica and start resolving DNS targets (inside the event loop)."""
        self._started = True
        for replica in self.replicas:
            self._watch(replica)
        if self.discovery is not None:
            self.discovery.start()

    def add_replica(self, spec: ReplicaSpec, *, server_name: str | None = None) -> Replica:
        """Add a replica (one DNS discovery found) to the rotation once its health stream says SERVING.
        ``server_name``: the name its TLS certificate is verified against (it is dialled by IP)."""
        channel = (self._channel_factory(spec.address, server_name=server_name) if server_name
                   else self._channel_factory(spec.address))
        replica = Replica(self.stage, spec, channel)
        self.replicas.append(replica)
        if self._started:
            self._watch(replica)
        return replica

    def remove_replica(self, replica: Replica) -> None:
        """Take a replica out of the pool for good (its address left DNS). Jobs that hold it keep its channel
        until they let it go (grpc closes a channel nobody refers to); new picks never see it."""
        if replica not in self.replicas:
            return
        position = self.replicas.index(replica)
        self.replicas.remove(replica)
        if position < self._cursor:
            self._cursor -= 1
        self._cursor = self._cursor % len(self.replicas) if self.replicas else 0
        task = self._watches.pop(replica, None)
        if task is not None:
            task.cancel()
        replica.serving, replica.state = False, "REMOVED (left DNS)"
        replica.loaded.clear()
        self._capacity_changed()

    @property
    def capacity(self) -> int:
        """Jobs the SERVING replicas run at once together; 0 while none is up or has reported (``Replica.capacity``)."""
        return sum(replica.capacity for replica in self.replicas if replica.serving)

    def _capacity_changed(self) -> None:
        if self.on_capacity is not None:
            self.on_capacity()

    async def _read_capacity(self, replica: Replica) -> None:
        """Ask a replica that turned SERVING how many jobs it runs at once (StatusService/GetStatus)."""
        try:
            status = await status_pb2_grpc.StatusServiceStub(replica.channel).GetStatus(
                status_pb2.GetStatusRequest(), timeout=10)
        except grpc.aio.AioRpcError as error:
            log.warning("%r did not say how many jobs it runs at once (%s: %s); admission counts it as 0",
                        replica, error.code().name, error.details())
            return
        if status.max_concurrent_jobs != replica.capacity:
            replica.capacity = status.max_concurrent_jobs
            self._capacity_changed()

    async def close(self) -> None:
        for task in self._capacity_reads:
            task.cancel()
        if self.discovery is not None:
            await self.discovery.close()
        for task in self._watches.values():
            task.cancel()
        for task in self._watches.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for replica in self.replicas:
            await replica.channel.close()

    def rotation(self) -> list[Replica]:
        """The healthy replicas in round-robin order, starting at the next one to pick."""
        count = len(self.replicas)
        ordered = [self.replicas[(self._cursor + offset) % count] for offset in range(count)]
        return [r for r in ordered if r.serving]

    def advance(self, replica: Replica) -> None:
        """Move the round robin past ``replica`` (one a job chose from ``rotation``)."""
        if replica in self.replicas:  # a replica DNS dropped meanwhile has no place in the rotation
            self._cursor = (self.replicas.index(replica) + 1) % len(self.replicas)

    def pick_now(self, device: str = "", *, prefer_device: str = "", avoid: Replica | None = None,
                 encoder: str = "") -> Replica | None:
        """The next healthy replica round robin (with ``device``: only that label; ``prefer_device``: that label
        when one is healthy; ``avoid``: another one when there is one; ``encoder``: only replicas hosting that
        text encoder), or None."""
        candidates = [r for r in self.replicas
                      if r.serving and (not device or r.device == device) and r.hosts(encoder)]
        if avoid is not None and len(candidates) > 1:
            candidates = [r for r in candidates if r is not avoid]
        preferred = [r for r in candidates if r.device == prefer_device]
        candidates = preferred or candidates
        count = len(self.replicas)
        for offset in range(count):
            index = (self._cursor + offset) % count
            if self.replicas[index] in candidates:
                self._cursor = (index + 1) % count
                return self.replicas[index]
        return None

    async def pick(self, device: str = "", *, prefer_device: str = "", avoid: Replica | None = None,
                   timeout: float | None = None, encoder: str = "") -> Replica:
        """A healthy replica as ``pick_now`` chooses, waiting for one (on the health streams, up to ``wait_s`` and
        ``timeout`` seconds) when none is healthy now; UNAVAILABLE naming the replicas and their state if none comes."""
        wait = self.wait_s if timeout is None else max(0.0, min(self.wait_s, timeout))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            self._changed.clear()
            replica = self.pick_now(device, prefer_device=prefer_device, avoid=avoid, encoder=encoder)
            if replica is not None:
                return replica
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise self._no_replica(device, encoder)
            if self.discovery is not None:  # none healthy: the names may know of others by now
                self.discovery.refresh_soon()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def mark_down(self, replica: Replica, why: str) -> None:
        """Take a replica whose call failed out of the rotation until its health stream, re-opened, says SERVING."""
        if self.discovery is not None:  # a failed replica may have left DNS: look again soon
            self.discovery.refresh_soon()
        if replica not in self.replicas:  # DNS dropped it already: nothing to watch any more
            log.warning("%r failed (%s); it is no longer in DNS", replica, why)
            return
        log.warning("%r failed (%s): out of the rotation until it reports SERVING again", replica, why)
        self._set(replica, False, f"FAILED ({why})")
        self._watch(replica)

    def any_channel(self) -> grpc.aio.Channel:
        """A channel for a one-off call: the next healthy replica's, else the first replica's."""
        replica = self.pick_now() or (self.replicas[0] if self.replicas else None)
        if replica is None:  # DNS named no replica (yet)
            raise self._no_replica("")
        return replica.channel

    async def pick_encoders(self, encoders, pins: Mapping[str, str], *, prefer=(),
                            timeout: float | None = None) -> dict[str, Replica]:
        """A healthy replica for each text encoder, as ``assign_encoders`` chooses them, waiting (as ``pick``) while
        some encoder has none; UNAVAILABLE naming the first such encoder if none comes."""
        wait = self.wait_s if timeout is None else max(0.0, min(self.wait_s, timeout))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            self._changed.clear()
            chosen, unplaced = assign_encoders(encoders, self.rotation(), pins, prefer=prefer)
            if not unplaced:
                for replica in dict.fromkeys(chosen.values()):
                    self.advance(replica)
                return chosen
            remaining = deadline - loop.time()
            if remaining <= 0:
                encoder = unplaced[0]
                raise self._no_replica(pin_of(pins, ENCODER_STAGE_PREFIX + encoder), encoder)
            if self.discovery is not None:  # as in pick
                self.discovery.refresh_soon()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def _no_replica(self, device: str, encoder: str = "") -> Unavailable:
        states = "; ".join(f"{r.address} [{r.device}] {r.state}" for r in self.replicas) or "none"
        if self.discovery is not None:
            states += f"; DNS: {self.discovery.describe()}"
        label = f" with device label {device!r}" if device else ""
        hosting = f" hosting {encoder}" if encoder else ""
        metadata = {"stage": self.stage, "device": device or "*", **({"encoder": encoder} if encoder else {})}
        return Unavailable(f"no healthy {self.stage} replica{hosting}{label} (waited {self.wait_s:g} s); "
                           f"replicas: {states}", reason="NO_HEALTHY_REPLICA", metadata=metadata)

    def _set(self, replica: Replica, serving: bool, state: str) -> None:
        changed = serving != replica.serving
        if changed:
            log.info("%r is %s", replica, state)
        replica.serving, replica.state = serving, state
        if changed:
            replica.loaded.clear()
        if serving:
            self._changed.set()
        if changed and serving:
            # A restarted replica may run with another --max-concurrent-jobs: read it at every turn to SERVING.
            task = asyncio.get_running_loop().create_task(self._read_capacity(replica))
            self._capacity_reads.add(task)
            task.add_done_callback(self._capacity_reads.discard)
        if changed:
            self._capacity_changed()

    def _watch(self, replica: Replica) -> None:
        previous = self._watches.get(replica)
        if previous is not None:
            previous.cancel()
        self._watches[replica] = asyncio.get_running_loop().create_task(
            self._watch_health(replica), name=f"health {replica.stage} {replica.address}")

    async def _watch_health(self, replica: Replica) -> None:
        """Follow the replica's Health/Watch stream for as long as the orchestrator runs.

        ``wait_for_ready`` holds a re-opened stream until the channel reconnects (grpc's own backoff), so
        a replica that is down costs nothing here; the short sleep only spaces out streams that a live
        server ends at once (one without health checking).
        """
        stub = health_pb2_grpc.HealthStub(replica.channel)
        failures = 0
        while True:
            call = stub.Watch(health_pb2.HealthCheckRequest(service=self.service), wait_for_ready=True)
            try:
                async for response in call:
                    failures = 0
                    status = response.status
                    if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
                        log.error("%r does not serve %s: check the placement", replica, self.service)
                    self._set(replica, status == health_pb2.HealthCheckResponse.SERVING,
                              health_pb2.HealthCheckResponse.ServingStatus.Name(status))
                self._set(replica, False, "UNREACHABLE (health stream ended)")
            except grpc.aio.AioRpcError as error:
                self._set(replica, False, f"UNREACHABLE ({error.code().name})")
            finally:
                call.cancel()
            failures += 1
            await asyncio.sleep(min(5.0, 0.1 * 2 ** min(failures, 6)))


class StagePools:
    """A ReplicaPool for every placed stage."""

    def __init__(self, placement: Placement, channel_factory: Callable[[str], grpc.aio.Channel], *,
                 wait_s: float = 10.0):
        self.placement = placement
        self.pools = {stage: ReplicaPool(stage, specs, channel_factory, wait_s=wait_s)
                      for stage, specs in placement.items()}

    def __getitem__(self, stage: str) -> ReplicaPool:
        return self.pools[stage]

    def __contains__(self, stage: str) -> bool:
        return stage in self.pools

    def start(self) -> None:
        for pool in self.pools.values():
            pool.start()

    def watch_capacity(self, callback: Callable[[], None]) -> None:
        """Have ``callback`` called whenever a pool's capacity (``ReplicaPool.capacity``) may have changed."""
        for pool in self.pools.values():
            pool.on_capacity = callback

    async def close(self) -> None:
        for pool in self.pools.values():
            await pool.close()
