"""The denoiser's side of the ControlNet stream: one bidirectional call per run, straight to the ControlNet service.

The denoising loop runs on a worker thread, so the stream uses grpc's blocking API: each step
puts its input on the request queue and waits for the matching residuals. Channels are kept
per address and reused by later runs.
"""
from __future__ import annotations

import queue
import threading

import grpc
import torch

from latentwire.controlnet.v1 import controlnet_pb2, controlnet_pb2_grpc
from services.runtime import tensors
from services.runtime.channels import sync_channel
from services.runtime.errors import Internal, Unavailable, from_rpc_error

_FLOATS = (tensors.DataType.DATA_TYPE_FLOAT32, tensors.DataType.DATA_TYPE_FLOAT16, tensors.DataType.DATA_TYPE_BFLOAT16)
_END = object()


class ControlNetChannels:
    """Blocking channels to ControlNet services, one per address."""

    def __init__(self, options: list[tuple[str, int]]):
        self._options = options
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def stub(self, address: str) -> controlnet_pb2_grpc.ControlNetServiceStub:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = sync_channel(address, options=self._options)
        return controlnet_pb2_grpc.ControlNetServiceStub(channel)

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
