"""The in-server stage clock (benchmarks/in_situ.py) against a real pdp serve."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from benchmarks import in_situ, inprocess
from benchmarks.harness import run_load


def test_the_clock_counts_every_stage_of_every_check(tmp_path: Path) -> None:
    """Each stage is wrapped by the name the Check path looks it up by: a renamed
    function would leave its wrapper unused, and its stage would count no call."""
    listed, snapshot, out = tmp_path / "addresses.txt", tmp_path / "rules.json", tmp_path / "stages.json"
    listed.write_text("\n".join(inprocess.located_addresses(40)))
    snapshot.write_bytes(inprocess.make_rules(100))
    server = in_situ.start_clocked(tmp_path, snapshot, out)
    try:
        run_load("--target", server.address, "--addresses", str(listed), "--mode", "closed", "--in-flight", "4",
                 "--warmup", "0", "--seconds", "60", "--max-calls", "40")  # fmt: skip
        server.process.send_signal(signal.SIGUSR1)
        warm = in_situ._written(Path(f"{out}.warm"))
        run_load("--target", server.address, "--addresses", str(listed), "--mode", "closed", "--in-flight", "4",
                 "--warmup", "0", "--seconds", "60", "--max-calls", "60")  # fmt: skip
    finally:
        server.stop()
    counted = in_situ._minus(json.loads(out.read_text()), warm)
    calls = {stage: count for stage, (_, count) in counted.items()}
    assert calls == dict.fromkeys([*in_situ.STAGES, "control", "clock"], calls["handler"])
    assert calls["handler"] >= 60  # the load generator may send a few more than asked
    # Time was counted in every stage. Not per_call > 0: with the clock's own cost taken off,
    # a stage as cheap as the meeting memo's dict lookup comes out at about zero, either side.
    assert all(counted[stage][0] > 0 for stage in in_situ.STAGES)
    per_call = in_situ._per_call(counted)
    assert per_call["handler"] > per_call["decision path"] > 0
