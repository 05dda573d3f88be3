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
from typing import Awaitable, Callable, Mapping, TypeVar

import grpc

from latentwire.denoiser.v1 import denoiser_pb2_grpc
from latentwire.registry.v1 import registry_pb2, registry_pb2_grpc
from services.runtime.errors import LatentwireError, Unavailable, error_info_of, from_rpc_error
from services.runtime.jobs import Job

from .deadline import Deadline
from .placement import Replica, StagePools

log = logging.getLogger(__name__)
T = TypeVar("T")

#: The reason of a stage that stopped a job because it is shutting down (services/runtime/server.py).
SHUTTING_DOWN = "SHUTTING_DOWN"


class Stages:
    """The stage services, a pool of replicas each (placement.py), and, when configured, the model registry."""

    def __init__(self, pools: StagePools, registry: grpc.aio.Channel | None = None, *, step_timeout_s: float = 0.0,
                 max_failovers: int = 3):
        self.pools = pools
        self.registry = registry_pb2_grpc.RegistryServiceStub(registry) if registry is not None else None
        #: Seconds to wait for the denoiser's next step before its replica counts as lost (0: no limit).
        self.step_timeout_s = step_timeout_s
        #: Replica switches one job may make before its stage error is final.
        self.max_failovers = max_failovers

    @property
    def denoiser(self) -> denoiser_pb2_grpc.DenoiserServiceStub:
        """A denoiser stub for one-off calls (ListSchedulers), on the next healthy replica."""
        return denoiser_pb2_grpc.DenoiserServiceStub(self.pools["denoiser"].any_channel())

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
    """The replica each stage of one job runs on, and the switch to another one when it fails."""

    def __init__(self, stages: Stages, job: Job, pins: Mapping[str, str], deadline: Deadline):
        self.stages = stages
        self.job = job
        self.pins = dict(pins)
        #: The job's deadline: every stage call and replica wait gets what is left of it.
        self.deadline = deadline
        self.current: dict[str, Replica] = {}
        self.failovers = 0

    async def pick(self, stage_names) -> None:
        """Pick a healthy replica for each stage (round robin, within its pin), waiting briefly for one."""
        for stage in stage_names:
            self.current[stage] = await self.stages.pools[stage].pick(self.pins.get(stage, ""),
                                                                      timeout=self.deadline.remaining())

    async def fail_over(self, stage: str, error: LatentwireError) -> Replica:
        """Take the stage's failed replica out of the rotation and switch to another healthy one, preferring the
        same device label (the result is bit-identical only on the same kind of device); raise ``error`` when
        there is none or the job has switched too often.

        A replica that stopped the job because it is shutting down (UNAVAILABLE, reason SHUTTING_DOWN: a
        planned stop, nobody cancelled the job) is waited for like a job waits for a replica at its start
        (up to --replica-wait-s), even when it is the only one: it may come back, restarted."""
        failed = self.current[stage]
        pool = self.stages.pools[stage]
        pool.mark_down(failed, error.message)
        pin = self.pins.get(stage, "")
        planned_stop = isinstance(error, Unavailable) and error.reason == SHUTTING_DOWN
        if not planned_stop and not any(r is not failed and (not pin or r.device == pin) for r in pool.replicas):
            raise error  # a single replica: nothing to switch to (as before placement)
        if self.failovers >= self.stages.max_failovers:
            raise error
        try:
            replica = await pool.pick(pin, prefer_device=failed.device, avoid=failed,
                                      timeout=self.deadline.remaining())
        except Unavailable as none:
            raise type(error)(f"{error.message}; and no other replica to continue on: {none.message}",
                              reason=error.reason, metadata=error.metadata) from None
        self.failovers += 1
        self.current[stage] = replica
        log.warning("job %s: %r failed (%s); continuing on %r", self.job.job_id, failed, error.message, replica)
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
    while True:
        try:
            return await call(replicas.current[stage])
        except grpc.RpcError as error:
            failure = from_rpc_error(error, stage)
            if lost_replica(error, stage) != stage:
                raise failure from None
            await replicas.fail_over(stage, failure)
