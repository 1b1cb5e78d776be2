"""The audit log's file (pdp/audit_file.py) against what operators and disks do to it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdp.audit_file import RecordFile


def test_a_log_removed_under_the_writer_is_started_again_not_the_end_of_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A rotation that finds the file gone (removed by hand, or by a cleaner) fails its
    rename; before, the writer was left with a closed file and died at its next flush."""
    path = tmp_path / "audit.jsonl"
    log = RecordFile(str(path), max_bytes=100, backups=2)
    record = b'{"verdict":"DENY","padding":"' + b"x" * 20 + b'"}\n'
    log.write([record] * 2)
    path.unlink()
    log.write([record] * 6)  # past max_bytes: a rotation, whose rename finds no file
    log.write([record])
    log.close()
    assert log.written + log.dropped == 9
    assert log.written >= 7  # the two before, and every record after the rotation that failed
    lines = [line for file in tmp_path.iterdir() for line in file.read_bytes().splitlines(keepends=True)]
    assert all(line == record for line in lines)
    assert any("records are dropped" in r.getMessage() for r in caplog.records if r.name == "pdp.audit")


def test_records_are_rotated_between_records_never_inside_one(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = RecordFile(str(path), max_bytes=100, backups=3)
    records = [f'{{"n":{n},"pad":"{"y" * 30}"}}\n'.encode() for n in range(10)]
    log.write(records[:4])
    log.write(records[4:])
    log.close()
    assert (log.written, log.dropped) == (10, 0)
    kept = [path, *(path.with_name(f"{path.name}.{n}") for n in (1, 2, 3))]
    assert not path.with_name(f"{path.name}.4").exists()  # three backups, no more
    for file in kept:
        data = file.read_bytes()
        assert data.endswith(b"\n")
        assert len(data) <= 100
        assert all(line + b"\n" in records for line in data.splitlines())
