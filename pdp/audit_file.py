"""Where the audit log's lines go: a file rotated by size, or standard output, written
so that every record is known to be written whole or counted as dropped.

The file is written unbuffered, a batch of records in one ``write`` call: a failing
disk (full, gone, read-only) then fails that call and nothing is held in a buffer
that a later flush might write or lose. What the call did write is counted record by
record, a record cut short by it is closed with a newline before the next write (so
one torn line never spoils the next), and the rest are dropped. The writer is never
stopped by the disk: a file that cannot be opened or rotated is tried again with the
next batch. The first failure is logged, and the first success after it.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import sys
from pathlib import Path
from typing import BinaryIO

__all__ = ["RecordFile"]

log = logging.getLogger("pdp.audit")


class RecordFile:
    """``target`` ("stdout" or a path) taking batches of encoded records; rotated past
    ``max_bytes`` keeping ``backups`` older files. Used by one thread (the audit writer).

    :raises OSError: from the constructor only: ``target``'s file cannot be opened.
    """

    def __init__(self, target: str, max_bytes: int, backups: int) -> None:
        self.target, self.max_bytes, self.backups = target, max_bytes, backups
        self.written = 0  # records written whole
        self.dropped = 0  # records not written, or cut short
        self._file: BinaryIO | None = None
        self._size = 0
        self._torn = False  # the file ends inside a record: start the next write on a new line
        self._failing = False
        if target != "stdout":
            self._open()

    def write(self, records: list[bytes]) -> None:
        """Write ``records`` (each whole lines, newline-terminated) in order, rotating
        between two records once the file would pass ``max_bytes``."""
        start, size = 0, self._size
        for position, record in enumerate(records):
            if self.target != "stdout" and size and size + len(record) > self.max_bytes:
                self._write(records[start:position])
                self._rotate()
                start, size = position, 0
            size += len(record)
        self._write(records[start:])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _write(self, records: list[bytes]) -> None:
        if not records:
            return
        if self.target == "stdout":
            sys.stdout.write(b"".join(records).decode())
            sys.stdout.flush()
            self.written += len(records)
            return
        prefix = b"\n" if self._torn else b""
        data = prefix + b"".join(records)
        done, error = 0, None
        try:
            if self._file is None:
                self._open()
            assert self._file is not None
            view = memoryview(data)
            while done < len(data):
                count = self._file.write(view[done:])
                if not count:
                    raise OSError(f"wrote nothing of {len(data) - done} bytes")
                done += count
        except OSError as caught:
            error = caught
        ends = list(itertools.accumulate(map(len, records), initial=len(prefix)))[1:]  # where each record ends
        whole = bisect.bisect_right(ends, done)
        self.written += whole
        self.dropped += len(records) - whole
        self._size += done
        if done:
            self._torn = done not in ends and done != len(prefix)
        self._report(error)

    def _report(self, error: OSError | None) -> None:
        if error is not None and not self._failing:
            log.warning("audit log %s: %s; records are dropped while it lasts (pdp.audit.records)",
                        self.target, error.strerror or error)  # fmt: skip
        elif error is None and self._failing:
            log.warning("audit log %s: written again", self.target)
        self._failing = error is not None

    def _open(self) -> None:
        path = Path(self.target)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("ab", buffering=0)
        self._size = path.stat().st_size

    def _rotate(self) -> None:
        """Shift the older files up by one and start a new one. A failure leaves no
        file open: the next batch opens one again (or is dropped, and logged)."""
        self.close()
        self._size = 0
        path = Path(self.target)
        try:
            for number in range(self.backups - 1, 0, -1):
                older = path.with_name(f"{path.name}.{number}")
                if older.exists():
                    older.replace(path.with_name(f"{path.name}.{number + 1}"))
            path.replace(path.with_name(f"{path.name}.1"))
        except OSError as error:
            self._report(error)
        self._torn = False
