"""The generated stubs match proto/, and the wire enums match the model's."""

from __future__ import annotations

import subprocess
import sys

from pdp._proto import admission_pb2 as pb
from pdp.model import Action, Verdict

from .conftest import ROOT


def test_generated_stubs_are_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_model_enums_equal_the_wire_values() -> None:
    assert {a.name: int(a) for a in Action} == {"JOIN": pb.ACTION_JOIN, "HOST": pb.ACTION_HOST}
    assert {v.name: int(v) for v in Verdict} == {"ALLOW": pb.VERDICT_ALLOW, "DENY": pb.VERDICT_DENY}


def test_protobuf_runs_on_upb() -> None:
    from google.protobuf.internal import api_implementation

    assert api_implementation.Type() == "upb"
