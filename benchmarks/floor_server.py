"""The floor: a server for pdp's proto that answers every Check with a constant.

    python -m benchmarks.floor_server --mode sync|sync-guarded|aio --listen unix:/tmp/floor.sock

``sync-guarded`` is built exactly as `pdp serve` builds its server (same threads,
channel options and receive guard, see pdp.receiving.CallThreads); ``sync`` is the
same without the guard, on a plain pool of as many threads; ``aio`` is the grpc.aio
alternative with the same options. It prints one line once listening, like `pdp serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from concurrent import futures

import grpc

from pdp._proto import admission_pb2 as pb
from pdp.config import ServeConfig
from pdp.receiving import CallThreads, GuardedHandlers
from pdp.server import grpc_options

RESPONSE = pb.CheckResponse(
    verdict=pb.VERDICT_DENY,
    rule_id="cn-memorial",
    reason="participants located in CN may not join memorial meetings",
    legal_basis="Order 17/2020",
    location=pb.Location(found=True, country="CN", subdivisions=["CN-22"]),
    policy_version=1,
    geoip_build=1530653216,
)


def sync_check(request: pb.CheckRequest, context: grpc.ServicerContext) -> pb.CheckResponse:
    return RESPONSE


async def aio_check(request: pb.CheckRequest, context: grpc.aio.ServicerContext[object, object]) -> pb.CheckResponse:
    return RESPONSE


def handlers(check: object) -> grpc.GenericRpcHandler:
    """Only Check: decoding the request and encoding a response is all the floor does."""
    method = grpc.unary_unary_rpc_method_handler(
        check,  # type: ignore[arg-type]  # one helper for the sync and the aio callable
        request_deserializer=pb.CheckRequest.FromString,
        response_serializer=pb.CheckResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler("pdp.v1.AdmissionService", {"Check": method})


def _address(listen: str, port: int) -> str:
    """What clients dial: the listen address with the port the kernel picked."""
    return listen if listen.startswith("unix:") else f"{listen.rsplit(':', 1)[0]}:{port}"


def serve_sync(config: ServeConfig, *, guarded: bool = False) -> None:
    """``guarded``: every request received through pdp's ReceiveGuard, as `pdp serve` does."""
    floor = handlers(sync_check)
    if guarded:
        threads = CallThreads.start(config.workers, config.receive_timeout)
        server = grpc.server(threads.calls, options=grpc_options(config))
        server.add_generic_rpc_handlers((GuardedHandlers([floor], threads.guard, threads.streams),))
    else:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers), options=grpc_options(config))
        server.add_generic_rpc_handlers((floor,))
    bound = server.add_insecure_port(config.listen)
    server.start()
    print(f"floor (sync) listening on {_address(config.listen, bound)}", flush=True)
    server.wait_for_termination()


async def serve_aio(config: ServeConfig) -> None:
    server = grpc.aio.server(options=grpc_options(config))
    server.add_generic_rpc_handlers((handlers(aio_check),))
    bound = server.add_insecure_port(config.listen)
    await server.start()
    print(f"floor (aio) listening on {_address(config.listen, bound)}", flush=True)
    await server.wait_for_termination()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("sync", "sync-guarded", "aio"), default="sync")
    parser.add_argument("--listen", required=True)
    options = parser.parse_args()
    config = ServeConfig(listen=options.listen)
    if options.mode.startswith("sync"):
        serve_sync(config, guarded=options.mode == "sync-guarded")
    else:
        asyncio.run(serve_aio(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
