"""Responses encoded once and reused must equal the messages built field by field."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pdp._proto import admission_pb2 as pb
from pdp.geo import GeoDatabase
from pdp.model import Decision, Location, Verdict
from pdp.state import Active, PolicyHolder
from pdp.wire import check_response, encode_batch, encode_check, encode_result

from .conftest import CITY_DB, policy_from

text = st.text(max_size=300)
decisions = st.builds(
    Decision,
    st.sampled_from([Verdict.ALLOW, Verdict.DENY]),
    text,
    text,
    text,
    st.lists(st.text(min_size=1, max_size=20), max_size=3).map(tuple),
)
locations = st.one_of(
    st.just(Location()),
    st.builds(
        Location, st.sampled_from(["CN", "US", "GB", "HK"]), st.lists(st.sampled_from(["X-1", "Y-22"])).map(tuple)
    ),
)


def active_state(version: int = 5) -> Active:
    holder = PolicyHolder()
    return holder.activate(policy_from(f"version: {version}\nrules: []\n"), GEO, "s")


GEO = GeoDatabase(CITY_DB)


@settings(max_examples=200, deadline=None)
@given(decisions, locations)
def test_encoded_check_equals_the_built_message(decision: Decision, location: Location) -> None:
    active = active_state()
    once = encode_check(decision, location, active)
    again = encode_check(decision, location, active)
    expected = check_response(decision, location, active)
    assert pb.CheckResponse.FromString(once) == expected
    assert again == once


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(decisions, locations), min_size=1, max_size=20), st.integers(0, 2**62))
def test_encoded_batch_equals_the_built_message(decided: list[tuple[Decision, Location]], version: int) -> None:
    active = active_state(version)
    encoded = pb.CheckBatchResponse.FromString(
        encode_batch([encode_result(d, loc, active) for d, loc in decided], active)
    )
    expected = pb.CheckBatchResponse(
        results=[check_response(d, loc, active) for d, loc in decided],
        policy_version=version,
        geoip_build=GEO.build_epoch,
    )
    assert encoded == expected


def test_cache_is_per_activation_and_skips_shadow_decisions() -> None:
    active = active_state()
    plain = Decision(Verdict.DENY, "r", "why", "law")
    shadowed = Decision(Verdict.ALLOW, shadow_rule_ids=("s",))
    encode_check(plain, Location("CN"), active)
    encode_check(shadowed, Location("CN"), active)
    assert len(active.encoded) == 1
    assert active_state().encoded == {}
