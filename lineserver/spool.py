"""The disk spool's format and its segment files, without Twisted.

A spool is a directory of append-only segment files named by a growing
sequence number (C{00000000000000000001.seg}, ...).  A segment starts with
L{MAGIC} and holds records, one per batch of lines:

    length  u32 little-endian   bytes of the payload
    lines   u32 little-endian   lines in the payload (a batch may be [b""])
    crc     u32 little-endian   zlib.crc32 of length, lines and payload
    payload the lines joined by LF (no line holds an LF: framing ends
            lines there)

The checksum is CRC-32 (zlib's, the polynomial of gzip and PNG): it is in
the standard library, runs at several GB/s, and catches every burst error
up to 32 bits and any torn tail, which is what a spool must detect.  CRC-32C
would need a compiled third-party package for no gain in what is detected
here.  Covering the header too means a damaged length is caught as well.

L{decode} is pure: it reads as many whole, intact records as the bytes hold
and says where and why it stopped.  L{SegmentStore} does the blocking file
work (append and fsync, read back, delete, recover after a crash); the
Twisted wrapper (L{lineserver.sinks.spooling}) calls it from one thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

#: The first bytes of every segment file: the format and its version.
MAGIC = b"LSSPOOL1"
HEADER = struct.Struct("<III")
SUFFIX = ".seg"
#: A record larger than this is damage, not data (lines are far shorter).
MAX_PAYLOAD = 1 << 30


def encode(lines: Sequence[bytes]) -> bytes:
    """
    @return: one record holding C{lines}, in order.
    """
    payload = b"\n".join(lines)
    head = struct.pack("<II", len(payload), len(lines))
    crc = zlib.crc32(payload, zlib.crc32(head))
    return head + struct.pack("<I", crc) + payload


def payload_lines(payload: bytes, count: int) -> list[bytes]:
    """
    @return: the C{count} lines a record's payload holds.
    """
    if count == 0:
        return []
    return payload.split(b"\n")


@dataclass(frozen=True)
class Record:
    """
    Where one record lies in its segment, and how many lines it holds.

    @ivar offset: the record's first byte (its header) in the file.
    @ivar size: header and payload, in bytes.
    """

    segment: int
    offset: int
    size: int
    lines: int

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass
class Decoded:
    """
    What L{decode} found in a segment's bytes.

    @ivar records: every whole, intact record, in order, as (offset, size,
        lines in it, the lines).
    @ivar end: the offset just after the last good record: what a
        recovery keeps of the file.
    @ivar damage: None if every byte was used; else why the rest was not
        (a torn record at the end, a checksum that does not match).
    """

    records: list[tuple[int, int, list[bytes]]] = field(default_factory=list)
    end: int = 0
    damage: str | None = None


def decode(data: bytes, start: int = 0) -> Decoded:
    """
    Read the records of a segment (C{data} from offset C{start}, after the
    magic, or a part of a segment holding whole records).

    Any prefix of a valid segment decodes to exactly the records that lie
    wholly inside it; a changed byte is caught by the checksum (or by a
    length that runs past the end), and decoding stops there.
    """
    result = Decoded(end=start)
    view = memoryview(data)
    offset = start
    while offset < len(data):
        if len(data) - offset < HEADER.size:
            result.damage = f"a torn record header at byte {offset}"
            break
        length, count, crc = HEADER.unpack_from(data, offset)
        body = offset + HEADER.size
        if length > MAX_PAYLOAD or count > length + 1:
            result.damage = f"a damaged record header at byte {offset}"
            break
        if body + length > len(data):
            result.damage = f"a torn record at byte {offset}"
            break
        payload = bytes(view[body : body + length])
        if zlib.crc32(payload, zlib.crc32(view[offset : offset + 8])) != crc:
            result.damage = f"a record whose checksum does not match at byte {offset}"
            break
        lines = payload_lines(payload, count)
        if len(lines) != count:
            result.damage = f"a record whose line count does not match at byte {offset}"
            break
        result.records.append((offset, HEADER.size + length, lines))
        offset = body + length
        result.end = offset
    return result


def segment_name(number: int) -> str:
    return f"{number:020d}{SUFFIX}"


class SpoolLocked(OSError):
    """
    Another process (or another spool in this one) uses the directory.
    """


@dataclass
class Recovered:
    """
    What a spool directory held at open.

    @ivar records: every intact record, oldest first.
    @ivar damaged: one text per segment that had to be cut (why, where,
        how many bytes were dropped), for the log.
    @ivar dropped_bytes: bytes cut off damaged segments.
    """

    records: list[Record] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    dropped_bytes: int = 0


class SegmentStore:
    """
    The segment files of one spool directory: blocking I/O, one caller at
    a time (one thread).

    @ivar disk_bytes: the size of every segment file together.
    """

    def __init__(self, directory: str, segment_bytes: int = 64 << 20) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.disk_bytes = 0
        self._sizes: dict[int, int] = {}
        self._active: int | None = None
        self._fd: int | None = None
        self._lock: int | None = None

    def open(self) -> Recovered:
        """
        Take the directory (creating it), lock it, and read every segment:
        a segment's damaged tail is cut off (and fsynced), an empty one is
        deleted.

        @raise SpoolLocked: if another spool holds the directory.
        """
        os.makedirs(self.directory, exist_ok=True)
        lock = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise SpoolLocked(
                f"the spool {self.directory} is in use by another process"
            ) from None
        self._lock = lock
        recovered = Recovered()
        for number in self._numbers():
            path = self._path(number)
            with open(path, "rb") as segment:
                data = segment.read()
            if data[: len(MAGIC)] != MAGIC:
                good = Decoded(damage="no spool header")
                if not MAGIC.startswith(data):
                    # Not ours: leave it alone rather than delete it.
                    recovered.damaged.append(
                        f"{path}: not a spool segment; left in place, ignored"
                    )
                    continue
            else:
                good = decode(data, len(MAGIC))
            if good.damage is not None:
                cut = len(data) - max(good.end, 0)
                recovered.dropped_bytes += cut
                recovered.damaged.append(
                    f"{path}: {good.damage}; {cut} byte(s) dropped"
                )
            if not good.records:
                os.unlink(path)
                continue
            if good.damage is not None:
                with open(path, "r+b") as segment:
                    segment.truncate(good.end)
                    os.fsync(segment.fileno())
            self._sizes[number] = good.end
            for offset, size, lines in good.records:
                recovered.records.append(Record(number, offset, size, len(lines)))
        self._sync_directory()
        self.disk_bytes = sum(self._sizes.values())
        return recovered

    def append(self, lines: Sequence[bytes]) -> Record:
        """
        Write one record and fsync it; start a new segment once the active
        one has reached C{segment_bytes}.
        """
        record = encode(lines)
        if self._fd is None or self._sizes[self._active or 0] >= self.segment_bytes:
            self._roll()
        fd, number = self._fd, self._active
        assert fd is not None and number is not None
        offset = self._sizes[number]
        try:
            _write_all(fd, record)
            os.fsync(fd)
        except OSError:
            # Leave no torn record behind for the next append to follow.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, offset)
            raise
        self._sizes[number] = offset + len(record)
        self.disk_bytes += len(record)
        return Record(number, offset, len(record), len(lines))

    def read(self, records: Sequence[Record]) -> list[bytes]:
        """
        @return: the lines of C{records} (consecutive ones, in order).
        @raise ValueError: if what is read back is damaged.
        """
        lines: list[bytes] = []
        by_segment: dict[int, list[Record]] = {}
        for record in records:
            by_segment.setdefault(record.segment, []).append(record)
        for number, group in by_segment.items():
            start, end = group[0].offset, group[-1].end
            with open(self._path(number), "rb") as segment:
                segment.seek(start)
                data = segment.read(end - start)
            decoded = decode(data)
            if decoded.damage is not None or len(decoded.records) != len(group):
                raise ValueError(
                    f"{self._path(number)}: {decoded.damage or 'records missing'}"
                )
            for _, _, got in decoded.records:
                lines.extend(got)
        return lines

    def delete(self, number: int, end: int) -> None:
        """
        Delete segment C{number} if it ends at C{end} (nothing was added
        to it after the records its caller knows are delivered).
        """
        if self._sizes.get(number) != end:
            return
        if number == self._active:
            self._close_active()
        os.unlink(self._path(number))
        self.disk_bytes -= self._sizes.pop(number)

    def close(self) -> None:
        self._close_active()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _numbers(self) -> list[int]:
        numbers = []
        for name in os.listdir(self.directory):
            stem, suffix = name[: -len(SUFFIX)], name[-len(SUFFIX) :]
            if suffix == SUFFIX and stem.isdigit():
                numbers.append(int(stem))
        return sorted(numbers)

    def _path(self, number: int) -> str:
        return os.path.join(self.directory, segment_name(number))

    def _roll(self) -> None:
        self._close_active()
        number = max(self._sizes, default=0) + 1
        for existing in self._numbers():
            number = max(number, existing + 1)
        fd = os.open(
            self._path(number),
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
            0o600,
        )
        try:
            _write_all(fd, MAGIC)
            os.fsync(fd)
            self._sync_directory()
        except OSError:
            os.close(fd)
            os.unlink(self._path(number))
            raise
        self._fd, self._active = fd, number
        self._sizes[number] = len(MAGIC)
        self.disk_bytes += len(MAGIC)

    def _close_active(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = self._active = None

    def _sync_directory(self) -> None:
        """
        Make a new segment's name durable, not only its bytes.
        """
        if self._lock is not None:
            os.fsync(self._lock)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    written = 0
    while written < len(data):
        written += os.write(fd, view[written:])
