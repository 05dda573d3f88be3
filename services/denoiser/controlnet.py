"""The denoiser's side of the ControlNet stream: one bidirectional call per run, straight to a ControlNet replica.

The replicas are the denoiser's own configuration (``--controlnet-address [NAME=]HOST:PORT``, repeatable);
a request picks one only by NAME, never by address, so no request can make the denoiser connect anywhere
else (issue 11, finding 5). Without a name the denoiser goes round robin, moving on to the next replica
when one is unavailable as the stream opens; a replica lost mid-run fails the run UNAVAILABLE with stage
"controlnet", and the orchestrator resumes it from its checkpoint on another replica.

The denoising loop runs on a worker thread, so the stream uses grpc's blocking API: each step
puts its input on the request queue and waits for the matching residuals. Channels are kept
per replica and reused by later runs.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
from dataclasses import dataclass

import grpc
import torch

from latentwire.controlnet.v1 import controlnet_pb2, controlnet_pb2_grpc
from latentwire.denoiser.v1 import denoiser_pb2
from services.runtime import tensors
from services.runtime.channels import sync_channel
from services.runtime.config import ADDRESS_PATTERN
from services.runtime.errors import (ConfigurationError, FailedPrecondition, Internal, InvalidArgument, Unavailable,
                                     from_rpc_error, quote)

log = logging.getLogger(__name__)

_FLOATS = (tensors.DataType.DATA_TYPE_FLOAT32, tensors.DataType.DATA_TYPE_FLOAT16, tensors.DataType.DATA_TYPE_BFLOAT16)
_END = object()


@dataclass(frozen=True)
class ControlNetReplica:
    """One configured ControlNet replica: the name requests may use and the address only the denoiser knows."""

    name: str
    address: str


def parse_replicas(values: list[str] | None) -> tuple[ControlNetReplica, ...]:
    """Parse ``--controlnet-address`` values, each ``HOST:PORT`` (its own name) or ``NAME=HOST:PORT``.

    Raises ConfigurationError saying which value is wrong, so the service refuses to start.
    """
    replicas: list[ControlNetReplica] = []
    for value in values or []:
        value = value.strip()
        name, sep, address = value.partition("=")
        name, address = (name.strip(), address.strip()) if sep else (value, value)
        if not ADDRESS_PATTERN.match(address):
            raise ConfigurationError(f"--controlnet-address {quote(value)}: give HOST:PORT or NAME=HOST:PORT")
        if not name:
            raise ConfigurationError(f"--controlnet-address {quote(value)}: the replica name is empty; use "
                                     "NAME=HOST:PORT or HOST:PORT")
        if any(r.name == name for r in replicas):
            raise ConfigurationError(f"--controlnet-address {quote(value)}: the name {quote(name)} is given twice")
        replicas.append(ControlNetReplica(name, address))
    return tuple(replicas)


def check_conditioning(conditioning: denoiser_pb2.ControlNetConditioning) -> None:
    """Refuse a request that names a ControlNet address: the denoiser dials only its configured replicas."""
    if conditioning.address:
        raise InvalidArgument("controlnet.address is not accepted: the denoiser streams only with the ControlNet "
                              "replicas of its own --controlnet-address configuration; leave controlnet.address "
                              "empty and name one of them in controlnet.replica, or leave that empty too",
                              reason="CONTROLNET_ADDRESS_REFUSED", metadata={"field": "controlnet.address"})


class ControlNetReplicas:
    """The denoiser's configured ControlNet replicas: one blocking channel each, opened when first used."""

    def __init__(self, replicas: tuple[ControlNetReplica, ...], options: list[tuple[str, int]]):
        self.replicas = replicas
        self._options = options
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()
        self._turn = itertools.count()

    def candidates(self, name: str) -> list[ControlNetReplica]:
        """The replicas to try for a request, in order: the one it names, else all of them round robin.

        Raises FAILED_PRECONDITION when none is configured or the name is not one of them."""
        if not self.replicas:
            raise FailedPrecondition("this denoiser has no ControlNet replicas configured; start it with "
                                     "--controlnet-address HOST:PORT (or LATENTWIRE_CONTROLNET_ADDRESS) to run "
                                     "requests with ControlNet units", reason="CONTROLNET_NOT_CONFIGURED")
        if name:
            for replica in self.replicas:
                if replica.name == name:
                    return [replica]
            raise FailedPrecondition(f"controlnet.replica {quote(name)} is not one of this denoiser's ControlNet "
                                     "replicas; name one of its --controlnet-address NAME=HOST:PORT entries (HOST:PORT "
                                     "when the entry names none), or leave controlnet.replica empty",
                                     reason="CONTROLNET_REPLICA_UNKNOWN", metadata={"field": "controlnet.replica"})
        with self._lock:
            start = next(self._turn) % len(self.replicas)
        return [*self.replicas[start:], *self.replicas[:start]]

    def stub(self, replica: ControlNetReplica) -> controlnet_pb2_grpc.ControlNetServiceStub:
        with self._lock:
            channel = self._channels.get(replica.address)
            if channel is None:
                channel = self._channels[replica.address] = sync_channel(replica.address, options=self._options)
        return controlnet_pb2_grpc.ControlNetServiceStub(channel)

    def open(self, candidates: list[ControlNetReplica], setup: controlnet_pb2.ControlNetSetup,
             timeout: float | None) -> ControlNetStream:
        """Open the run's stream on the first candidate that answers; move on to the next while one is
        unavailable (the last one's error stands)."""
        for replica in candidates[:-1]:
            try:
                return ControlNetStream(self.stub(replica), setup, timeout)
            except Unavailable as error:
                if error.metadata.get("stage") != "controlnet":
                    raise  # something behind the replica (its registry) is out: the next one would fail alike
                log.warning("ControlNet replica %s is unavailable (%s); trying the next one", replica.name,
                            error.message)
        return ControlNetStream(self.stub(candidates[-1]), setup, timeout)

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()


class ControlNetStream:
    """One run's ComputeResiduals stream: sends the setup, then one step input per step."""

    def __init__(self, stub: controlnet_pb2_grpc.ControlNetServiceStub, setup: controlnet_pb2.ControlNetSetup,
                 timeout: float | None):
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._requests.put(controlnet_pb2.ComputeResidualsRequest(setup=setup))
        self._call = stub.ComputeResiduals(self._outgoing(), timeout=timeout)
        first = self._next()
        if first.WhichOneof("output") != "ready":
            self._call.cancel()
            raise Internal("the ControlNet service did not answer the setup", reason="CONTROLNET_PROTOCOL")
        self.guess_mode = first.ready.guess_mode
        self.models = list(first.ready.models)
        self.bytes_received = 0

    def _outgoing(self):
        while True:
            item = self._requests.get()
            if item is _END:
                return
            yield item

    def _next(self) -> controlnet_pb2.ComputeResidualsResponse:
        try:
            return next(self._call)
        except StopIteration:
            raise Unavailable("the ControlNet service ended the stream before the run finished",
                              reason="CONTROLNET_STREAM_ENDED", metadata={"stage": "controlnet"}) from None
        except grpc.RpcError as error:
            raise from_rpc_error(error, "controlnet") from None

    def residuals(self, step_index: int, timestep: float, sample: torch.Tensor):
        """The summed residuals (down list, mid) for one step, or None when no ControlNet applies there."""
        self._requests.put(controlnet_pb2.ComputeResidualsRequest(step=controlnet_pb2.ControlNetStepInput(
            step_index=step_index, timestep=timestep, sample=tensors.to_proto(sample, "sample"))))
        response = self._next()
        if response.WhichOneof("output") != "residuals" or response.residuals.step_index != step_index:
            raise Internal(f"the ControlNet service answered step {step_index} out of order",
                           reason="CONTROLNET_PROTOCOL")
        result = response.residuals
        if not result.active:
            return None
        self.bytes_received += result.ByteSize()
        down = [tensors.from_proto(t, field="down_block_residuals", rank=4, dtypes=_FLOATS)
                for t in result.down_block_residuals]
        mid = tensors.from_proto(result.mid_block_residual, field="mid_block_residual", rank=4, dtypes=_FLOATS)
        return down, mid

    def close(self, ok: bool) -> None:
        """Half-close and let the service finish (ok), or cancel the call (the run failed or was cancelled)."""
        self._requests.put(_END)
        if not ok:
            self._call.cancel()
            return
        try:
            for _ in self._call:  # the service ends its side once ours is closed
                pass
        except grpc.RpcError:
            pass  # the run's result is already complete; a late stream error changes nothing
