"""The server interceptors wrap each method's handler once (interceptor.WrappingInterceptor), and every call still
gets its own checks: its caller's token, its own errors, its own stream.

A real grpc.aio server on a real port with the interceptors every service runs (services/runtime/server.py), one
unary and one server-streaming method; calls alternate between a good and a bad token, and between a request
that succeeds and one the handler refuses.
"""
from __future__ import annotations

import asyncio

import grpc
from google.protobuf import wrappers_pb2

from services.runtime import security, telemetry
from services.runtime.errors import InvalidArgument
from services.runtime.interceptor import DrainInterceptor, ErrorInterceptor, WrappingInterceptor

SERVICE = "latentwire.orchestrator.v1.OrchestratorService"  # a real service name, so a real scope applies
UNARY, STREAM = f"/{SERVICE}/Echo", f"/{SERVICE}/Count"


class _Counting(WrappingInterceptor):
    """Innermost: counts how often a handler is wrapped, and passes it through."""

    def __init__(self):
        super().__init__()
        self.wrapped: list[str] = []

    def wrap_handler(self, handler, method):
        self.wrapped.append(method)
        return handler


async def _echo(request: wrappers_pb2.StringValue, context) -> wrappers_pb2.StringValue:
    if request.value == "refuse":
        raise InvalidArgument("the value is 'refuse'; send anything else", reason="REFUSED")
    return wrappers_pb2.StringValue(value=request.value + security.current_caller().principal)


async def _count(request: wrappers_pb2.StringValue, context):
    for i in range(int(request.value)):
        yield wrappers_pb2.StringValue(value=str(i))
    if int(request.value) == 2:
        raise InvalidArgument("two is refused after its messages", reason="REFUSED")


def test_handlers_are_wrapped_once_per_method_and_each_call_is_checked_on_its_own():
    tokens = security.TokenTable.parse(["good generate principal=alice"])
    counting = _Counting()
    drain = DrainInterceptor()

    async def scenario():
        server = grpc.aio.server(interceptors=[
            telemetry.TelemetryInterceptor("test"), drain,
            security.AccessInterceptor(client_auth=False, tokens=tokens), ErrorInterceptor(), counting])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
            "Echo": grpc.unary_unary_rpc_method_handler(
                _echo, wrappers_pb2.StringValue.FromString, wrappers_pb2.StringValue.SerializeToString),
            "Count": grpc.unary_stream_rpc_method_handler(
                _count, wrappers_pb2.StringValue.FromString, wrappers_pb2.StringValue.SerializeToString),
        }),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        outcomes = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                echo = channel.unary_unary(UNARY, wrappers_pb2.StringValue.SerializeToString,
                                           wrappers_pb2.StringValue.FromString)
                count = channel.unary_stream(STREAM, wrappers_pb2.StringValue.SerializeToString,
                                             wrappers_pb2.StringValue.FromString)
                for i in range(3):
                    for token, value in (("good", "hi "), ("bad", "hi "), ("good", "refuse"), (None, "hi ")):
                        metadata = (("authorization", f"Bearer {token}"),) if token else ()
                        try:
                            reply = await echo(wrappers_pb2.StringValue(value=value), metadata=metadata, timeout=10)
                            outcomes.append(("echo", token, value, reply.value))
                        except grpc.aio.AioRpcError as error:
                            outcomes.append(("echo", token, value, error.code().name))
                    for token, n in (("good", 3), ("bad", 3), ("good", 2)):
                        got = []
                        try:
                            async for message in count(wrappers_pb2.StringValue(value=str(n)),
                                                       metadata=(("authorization", f"Bearer {token}"),), timeout=10):
                                got.append(message.value)
                            got.append("OK")
                        except grpc.aio.AioRpcError as error:
                            got.append(error.code().name)
                        outcomes.append(("count", token, n, got))
                assert drain.active == 0  # every call, refused or not, left the drain's count
        finally:
            await server.stop(None)
        return outcomes

    outcomes = asyncio.run(scenario())
    expected_round = [
        ("echo", "good", "hi ", "hi alice"),
        ("echo", "bad", "hi ", "UNAUTHENTICATED"),
        ("echo", "good", "refuse", "INVALID_ARGUMENT"),
        ("echo", None, "hi ", "UNAUTHENTICATED"),
        ("count", "good", 3, ["0", "1", "2", "OK"]),
        ("count", "bad", 3, ["UNAUTHENTICATED"]),
        ("count", "good", 2, ["0", "1", "INVALID_ARGUMENT"]),
    ]
    assert outcomes == expected_round * 3
    # 21 calls, each handler wrapped once (the calls refused by the token check never reached the innermost).
    assert sorted(counting.wrapped) == sorted([UNARY, STREAM])


def test_a_new_handler_for_a_method_is_wrapped_again():
    """The kept wrapping is reused only while the next interceptor answers with the same handler object."""
    counting = _Counting()
    handlers = [grpc.unary_unary_rpc_method_handler(_echo), grpc.unary_unary_rpc_method_handler(_echo)]
    details = type("Details", (), {"method": UNARY, "invocation_metadata": ()})()

    async def run():
        results = []
        for handler in (handlers[0], handlers[0], handlers[1], handlers[1], handlers[0]):
            async def continuation(_details, handler=handler):
                return handler
            results.append(await counting.intercept_service(continuation, details))
        return results

    results = asyncio.run(run())
    assert results == [handlers[0], handlers[0], handlers[1], handlers[1], handlers[0]]
    assert counting.wrapped == [UNARY, UNARY, UNARY]  # first, then on each change of handler
