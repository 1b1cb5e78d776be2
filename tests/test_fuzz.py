"""Fuzzing with hypothesis: the snapshot parser and the request handler.

Seeded from the corpora in test_hardening.py. The number of examples comes from
PDP_FUZZ_EXAMPLES (default 300; under CI=true 3,000, about 45 s, so that CI's whole
run stays near 10 minutes; ``make fuzz`` runs 50,000): no input may raise anything but
the documented errors, or make the server answer INTERNAL or UNKNOWN.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pdp.client import Client
from pdp.model import Verdict
from pdp.rules import SnapshotError, parse_policy

from .conftest import CN_MEMORIAL
from .test_hardening import CORPUS, GOOD, SNAPSHOTS, check

DEFAULT_EXAMPLES = 3_000 if os.environ.get("CI") == "true" else 300
EXAMPLES = int(os.environ.get("PDP_FUZZ_EXAMPLES", DEFAULT_EXAMPLES))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def mutate(seed: bytes, data: st.DataObject) -> bytes:
    """Flip, drop, duplicate or insert a few bytes of ``seed``."""
    buffer = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 8))):
        if not buffer:
            buffer.extend(data.draw(st.binary(min_size=1, max_size=8)))
            continue
        position = data.draw(st.integers(0, len(buffer) - 1))
        action = data.draw(st.sampled_from(["flip", "drop", "dup", "insert"]))
        if action == "flip":
            buffer[position] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "drop":
            del buffer[position]
        elif action == "dup":
            buffer[position:position] = buffer[position : position + data.draw(st.integers(1, 16))]
        else:
            buffer[position:position] = data.draw(st.binary(min_size=1, max_size=16))
    return bytes(buffer)


SNAPSHOT_SEEDS = [GOOD, CN_MEMORIAL.encode(), *(data for _, data, _ in SNAPSHOTS if len(data) < 10_000)]


@FUZZ
@given(st.sampled_from(SNAPSHOT_SEEDS), st.data(), st.sampled_from(["x.yaml", "x.json"]))
def test_snapshot_parser_only_ever_rejects_cleanly(seed: bytes, data: st.DataObject, name: str) -> None:
    mutated = mutate(seed, data)
    outcome: object
    try:
        outcome = parse_policy(mutated, name).version
    except SnapshotError as error:
        outcome = error.problems
    assert outcome or outcome == 0  # a version, or at least one problem; never another exception


@FUZZ
@given(st.binary(max_size=2048))
@example(b"\xef\xbb\xbf" + GOOD)
def test_snapshot_parser_survives_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(SnapshotError):
        parse_policy(data, "fuzz")


REQUEST_SEEDS = [data for _, method, data, _, _ in CORPUS if method == "Check" and len(data) < 4096] + [
    check(tags=["memorial"])
]
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}


@FUZZ
@given(st.sampled_from(REQUEST_SEEDS), st.data())
def test_request_handler_answers_every_mutation_with_a_specific_status(
    module_server: tuple[str, Client], seed: bytes, data: st.DataObject
) -> None:
    address, _client = module_server
    with grpc.insecure_channel(address) as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/pdp.v1.AdmissionService/Check")
        try:
            call(mutate(seed, data), timeout=10)
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    assert code in ALLOWED


def test_server_is_unchanged_after_fuzzing(module_server: tuple[str, Client]) -> None:
    _, client = module_server
    assert client.check("175.16.199.1", "m", tags=["memorial"]).verdict == Verdict.DENY
    assert client.status().serving


def test_fuzz_seeds_exist() -> None:
    assert Path(__file__).with_name("test_hardening.py").is_file()
    assert len(REQUEST_SEEDS) > 20
    assert len(SNAPSHOT_SEEDS) > 30
