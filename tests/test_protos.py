"""xds-protos beside googleapis-common-protos, grpcio-status and opentelemetry-proto, in one process.

xds-protos ships its own copies of modules those packages own (grpc/grpc#42830,
#42926); whichever is installed last wins the files. These tests fail when the
installed combination is not the one pdp is tested with, or does not work.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from .conftest import ROOT

# Run in a fresh interpreter: the test process has imported half of these already.
EVERYTHING_TOGETHER = textwrap.dedent(
    """
    import importlib, pkgutil
    import pdp
    for module in pkgutil.walk_packages(pdp.__path__, "pdp."):
        if module.name != "pdp.__main__":
            importlib.import_module(module.name)
    # What pdp imports lazily: the exporters OTEL_*_EXPORTER may name.
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetrics
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from grpc_status import rpc_status
    from google.rpc import code_pb2, status_pb2
    from envoy.service.auth.v3 import external_auth_pb2

    # Envoy's CheckResponse embeds google.rpc.Status: one class in one descriptor pool.
    field = external_auth_pb2.CheckResponse.DESCRIPTOR.fields_by_name["status"]
    assert field.message_type is status_pb2.Status.DESCRIPTOR
    response = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED))
    response.denied_response.status.code = 403
    again = external_auth_pb2.CheckResponse.FromString(response.SerializeToString())
    assert again.status.code == 7 and again.denied_response.status.code == 403
    # grpcio-status converts the same Status.
    assert rpc_status.to_status(status_pb2.Status(code=code_pb2.UNAVAILABLE, message="m")).details == "m"
    # The OTLP encoder needs opentelemetry-proto's InstrumentationScope, absent from xds-protos' copy.
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("pdp").start_as_current_span("check"):
        pass
    request = encode_spans(exporter.get_finished_spans())
    assert request.resource_spans[0].scope_spans[0].scope.name == "pdp"
    print("together: ok")
    """
)


def test_files_xds_protos_shares_belong_to_their_own_packages() -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "proto_overlap.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, f"{completed.stderr}run: python scripts/proto_overlap.py (make does)"


def test_everything_pdp_imports_works_in_one_process() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", EVERYTHING_TOGETHER], capture_output=True, text=True, check=False, cwd=ROOT
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "together: ok"
