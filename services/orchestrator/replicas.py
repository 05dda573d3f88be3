"""The stage services as a job sees them: one replica per stage, and the switch to another when one is lost.

`Stages` is what the orchestrator holds: a pool of replicas per stage (placement.py: health watched,
round-robin picks) and, when configured, the model registry. `JobReplicas` is one job's choice of
replica per stage. When a call fails because its replica died or was cut off, the job goes on with
another one: idempotent unary calls (text encoder, VAE) are simply repeated (`call_with_failover`);
the denoiser's stream resumes from its last checkpoint (execution.py). Every wait and call here gets
what is left of the job's `Deadline`.
"""
from __future__ import annotations

import logging
import time
from typing import Awaitable, Callable, Mapping, TypeVar

import grpc

from latentwire.common.v1 import model_pb2
from latentwire.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from latentwire.registry.v1 import registry_pb2, registry_pb2_grpc
from services.runtime.errors import LatentwireError, Unavailable, error_info_of, from_rpc_error
from services.runtime.jobs import Job

from .deadline import Deadline
from .placement import ENCODER_STAGE_PREFIX, Replica, StagePools, encoder_of, pin_of, pool_of

log = logging.getLogger(__name__)
T = TypeVar("T")

#: The reason of a stage that stopped a job because it is shutting down (services/runtime/server.py).
SHUTTING_DOWN = "SHUTTING_DOWN"


class Stages:
    """The stage services, a pool of replicas each (placement.py), and, when configured, the model registry."""

    def __init__(self, pools: StagePools, registry: grpc.aio.Channel | None = None, *, step_timeout_s: float = 0.0,
                 max_failovers: int = 3, denoiser_step_interval_ms: int = 0):
        self.pools = pools
        self.registry = registry_pb2_grpc.RegistryServiceStub(registry) if registry is not None else None
        #: Seconds to wait for the denoiser's next step before its replica counts as lost (0: no limit).
        self.step_timeout_s = step_timeout_s
        #: The denoiser sends a step message at most every this many milliseconds (0: every step).
        self.denoiser_step_interval_ms = denoiser_step_interval_ms
        #: Replica switches one job may make before its stage error is final.
        self.max_failovers = max_failovers
        #: DescribeModel answers by model key, for the orchestrator's life: a pinned "name@VERSION" never changes,
        #: and a local name stands for the folder the stages were started with.
        self.descriptions: dict[str, denoiser_pb2.DescribeModelResponse] = {}

    @property
    def denoiser(self) -> denoiser_pb2_grpc.DenoiserServiceStub:
        """A denoiser stub for one-off calls (ListSchedulers), on the next healthy replica."""
        return denoiser_pb2_grpc.DenoiserServiceStub(self.pools["denoiser"].any_channel())

    async def describe_model(self, replicas: JobReplicas, model: str, stage: str = "denoiser"
                             ) -> denoiser_pb2.DescribeModelResponse:
        """What ``model`` is (family, text encoders, defaults): the DescribeModel answer of the job's replica of
        ``stage`` (the denoiser, or the refiner's), asked once per model key."""
        described = self.descriptions.get(model)
        if described is None:
            request = denoiser_pb2.DescribeModelRequest(model=model_pb2.ModelReference(name=model))
            described = await call_with_failover(
                replicas, stage, lambda replica: denoiser_pb2_grpc.DenoiserServiceStub(replica.channel).DescribeModel(
                    request, timeout=replicas.deadline.remaining()))
            self.descriptions[model] = described
        return described

    async def resolve_model(self, name: str, deadline: Deadline) -> str:
        """Pin a registry reference to one version ("name@VERSION"); without a registry the name passes through."""
        if self.registry is None or not name:
            return name
        try:
            response = await self.registry.ResolveModel(
                registry_pb2.ResolveModelRequest(reference=name), timeout=deadline.remaining())
        except grpc.RpcError as error:
            raise from_rpc_error(error, "registry") from None
        return f"{response.model_version.model_id}@{response.model_version.version}"


class JobReplicas:
    """The replica each stage of one job runs on, and the switch to another one when it fails.

    ``current`` is keyed by stage key: a stage name ("denoiser", "vae", ...), "refiner" (the denoiser replica of
    an SDXL refiner run) or "text_encoder/ENCODER" (the replica running one text encoder of a multi-encoder
    model; several keys may share a replica). placement.pool_of names the stage whose replicas a key runs on.
    """

    def __init__(self, stages: Stages, job: Job, pins: Mapping[str, str], deadline: Deadline):
        self.stages = stages
        self.job = job
        self.pins = dict(pins)
        #: The job's deadline: every stage call and replica wait gets what is left of it.
        self.deadline = deadline
        self.current: dict[str, Replica] = {}
        self.failovers = 0
        #: Text encoders, by name, that replicas (by address) turned out not to run although the placement says
        #: they host them: passed over for the rest of the job.
        self.lacking: dict[str, set[str]] = {}
        #: The models each replica (by id) was asked to have in memory for this job (execution.load_model_on_stages):
        #: once the job succeeds, the replicas it ended on ran them moments ago (confirm_loaded).
        self.models: dict[int, set[str]] = {}

    def confirm_loaded(self) -> None:
        """The job succeeded: each replica it ended on had its models in memory moments ago, as a LoadModel READY
        there would say. Renews the memo that lets the next jobs skip their LoadModel round
        (execution.LOADED_MEMO_S), so steady traffic on a model never pays the round again."""
        now = time.monotonic()
        for replica in {id(r): r for r in self.current.values()}.values():
            for name in self.models.get(id(replica), ()):
                replica.loaded[name] = now

    async def pick(self, stage_names) -> None:
        """Pick a healthy replica for each stage key (round robin, within its pin), waiting briefly for one."""
        for stage in stage_names:
            # "text_encoder" (an SD 1.x/2.x model's, or the first pick for a model not yet described) goes to a
            # replica hosting the component every family but the SDXL refiner has.
            encoder = encoder_of(stage) or ("text_encoder" if stage == "text_encoder" else "")
            self.current[stage] = await self.stages.pools[pool_of(stage)].pick(
                pin_of(self.pins, stage), encoder=encoder, timeout=self.deadline.remaining())

    async def pick_encoders(self, encoders) -> list[str]:
        """Choose the text-encoder replicas of a multi-encoder model's ``encoders`` (placement.assign_encoders:
        per-encoder pins, what each replica hosts, as few replicas as possible, preferring those the job uses
        already); return their stage keys. An encoder the job has a replica for already keeps it."""
        keys = [ENCODER_STAGE_PREFIX + encoder for encoder in encoders]
        missing = [encoder for encoder, key in zip(encoders, keys) if key not in self.current]
        if missing:
            using = [replica for key, replica in self.current.items() if pool_of(key) == "text_encoder"]
            chosen = await self.stages.pools["text_encoder"].pick_encoders(
                missing, self.pins, prefer=using, timeout=self.deadline.remaining())
            for encoder, replica in chosen.items():
                self.current[ENCODER_STAGE_PREFIX + encoder] = replica
        return keys

    async def fail_over(self, stage: str, error: LatentwireError, failed: Replica | None = None) -> Replica:
        """Take the stage key's failed replica out of the rotation and switch to another healthy one, preferring
        the same device label (the result is bit-identical only on the same kind of device); raise ``error`` when
        there is none or the job has switched too often. Other keys of the job on the failed replica (text
        encoders it ran together) move too. ``failed``: the replica the failed call went to; when the key has
        moved off it already (another call of the job failed over first), its current replica is returned.

        A replica that stopped the job because it is shutting down (UNAVAILABLE, reason SHUTTING_DOWN: a
        planned stop, nobody cancelled the job) is waited for like a job waits for a replica at its start
        (up to --replica-wait-s), even when it is the only one: it may come back, restarted."""
        if failed is not None and self.current[stage] is not failed:
            return self.current[stage]
        failed = self.current[stage]
        pool = self.stages.pools[pool_of(stage)]
        pool.mark_down(failed, error.message)
        pin, encoder = pin_of(self.pins, stage), encoder_of(stage)
        planned_stop = isinstance(error, Unavailable) and error.reason == SHUTTING_DOWN
        if not planned_stop and not any(r is not failed and (not pin or r.device == pin) and r.hosts(encoder)
                                        for r in pool.replicas):
            raise error  # a single replica: nothing to switch to (as before placement)
        if self.failovers >= self.stages.max_failovers:
            raise error
        try:
            replica = await pool.pick(pin, prefer_device=failed.device, avoid=failed, encoder=encoder,
                                      timeout=self.deadline.remaining())
        except Unavailable as none:
            raise type(error)(f"{error.message}; and no other replica to continue on: {none.message}",
                              reason=error.reason, metadata=error.metadata) from None
        self.failovers += 1
        self.current[stage] = replica
        log.warning("job %s: %r failed (%s); continuing on %r", self.job.job_id, failed, error.message, replica)
        for other, previous in list(self.current.items()):
            if previous is failed and pool_of(other) == pool_of(stage):
                if replica.hosts(encoder_of(other)) and (not pin_of(self.pins, other)
                                                          or replica.device == pin_of(self.pins, other)):
                    self.current[other] = replica
                else:
                    self.current[other] = await pool.pick(pin_of(self.pins, other), prefer_device=failed.device,
                                                          avoid=failed, encoder=encoder_of(other),
                                                          timeout=self.deadline.remaining())
        return replica


def lost_replica(error: grpc.RpcError, stage: str) -> str | None:
    """Which stage lost a replica when a call to ``stage`` failed: ``stage`` itself, the ControlNet service behind
    the denoiser, or None when the failure is the request's own (another replica would fail the same way).

    UNAVAILABLE: the replica died, was cut off or is shutting down (refusing new calls). CANCELLED: it gave the
    call up while shutting down (a cancel of ours surfaces as asyncio.CancelledError, never as this code).
    """
    if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return None
    info = error_info_of(error)
    origin = info.metadata.get("stage", stage) if info is not None else stage
    if origin == stage or (stage == "denoiser" and origin == "controlnet"):
        return origin
    return None  # something further down (the registry a stage fetches from) is out, not this replica


async def call_with_failover(replicas: JobReplicas, stage: str, call: Callable[[Replica], Awaitable[T]]) -> T:
    """Run an idempotent unary stage call, repeating it on another replica when its replica is lost."""
    service = pool_of(stage)
    while True:
        replica = replicas.current[stage]
        try:
            return await call(replica)
        except grpc.RpcError as error:
            failure = from_rpc_error(error, service)
            if lost_replica(error, service) != service:
                raise failure from None
            await replicas.fail_over(stage, failure, replica)
