"""A real OTLP/gRPC trace receiver for the tests: the `TraceService` a collector serves on port 4317.

Built on grpcio's asyncio server and the service stubs generated in `opentelemetry-proto`
(`trace_service_pb2_grpc`); each `Export` call is decoded like an OTLP/HTTP body (`otlp_receiver.decode`), so
a test compares what the two transports delivered span for span.
"""

from __future__ import annotations

import asyncio
from typing import Callable

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.otlp_receiver import ReceivedSpan, decode


class GrpcReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.endpoint = ""  # http://127.0.0.1:<port>; set by the fixture
        self.spans: list[ReceivedSpan] = []
        self.calls = 0
        self.metadata: list[dict] = []
        self._changed = asyncio.Condition()

    async def Export(self, request, context):  # noqa: N802 - the generated service's method name
        spans = decode(request.SerializeToString())
        async with self._changed:
            self.calls += 1
            self.metadata.append(dict(context.invocation_metadata()))
            self.spans.extend(spans)
            self._changed.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    async def wait_for(self, predicate: Callable[["GrpcReceiver"], object], timeout: float = 10.0):
        async def until():
            async with self._changed:
                while not (result := predicate(self)):
                    await self._changed.wait()
                return result

        try:
            return await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            raise AssertionError(f"gRPC receiver: condition not met in {timeout}s; {self.calls} calls, "
                                 f"{len(self.spans)} spans") from None


@pytest.fixture
async def otlp_grpc():
    """A running GrpcReceiver on a free local port."""
    receiver = GrpcReceiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    receiver.endpoint = f"http://127.0.0.1:{port}"
    yield receiver
    await server.stop(grace=None)
