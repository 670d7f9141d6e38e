"""Pure line framing: bytes in, complete lines (or one error) out.

No sockets, no reactor: the rules of the protocol live here so that they can
be tested exhaustively.  The framer works on whole reads: one C{feed} call
finds every complete line of the read with C-level C{bytes} operations, so
the per-line cost in Python is nil.

Rules:
  - A line ends with LF.  One CR right before the LF is part of the
    terminator and is stripped; a CR anywhere else is data.
  - A line's length is counted without its terminator; a line of exactly
    C{max_line_length} bytes is accepted, one byte more is an error.
  - A partial line is an error as soon as it passes the limit by more than
    the one byte a pending CR may need, before its terminator arrives, so
    memory stays near the limit.
  - Bytes are never decoded: NUL, invalid UTF-8 and binary junk are data.
  - After an error the framer is spent: a client that broke the limit is
    disconnected, and nothing it sends afterwards is framed.

Another delimiter (a C{LineReceiver} subclass that sets C{delimiter}) is
taken exactly: lines end with it, nothing is stripped, and it may arrive
split across reads.
"""

from __future__ import annotations

from dataclasses import dataclass

LF = b"\n"
CR = b"\r"
CRLF = b"\r\n"

_NOTHING: list[bytes] = []
#: The tail of a framer with none, shared (an empty list per connection,
#: and per read, otherwise); never appended to: a tail starts a new list.
_NO_CHUNKS: list[bytes] = []
#: The tail of a spent framer (it broke the limit): empty and shared like
#: L{_NO_CHUNKS}, and it marks the framer spent (no flag slot of its own).
_FAILED: list[bytes] = []


class LineTooLong(Exception):
    """
    A line (complete or still arriving) is longer than the limit.
    """

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"line of {length}+ bytes exceeds the limit of {limit}")
        self.length = length
        self.limit = limit


@dataclass(frozen=True, slots=True)
class Frames:
    """
    What one read produced.

    @ivar lines: the complete lines, terminators stripped.
    @ivar raw: the same complete lines exactly as received, terminators
        included (echo replies with these bytes).
    @ivar error: the reason the framer stopped, or None.
    """

    lines: list[bytes]
    raw: bytes
    error: LineTooLong | None = None


EMPTY = Frames(_NOTHING, b"")


class LineFramer:
    """
    Incremental framer for one connection.

    The unterminated tail is kept as a list of chunks, joined only when its
    terminator arrives, so a long line that trickles in costs linear time
    rather than the quadratic append-then-split of C{LineReceiver}.
    """

    __slots__ = (
        "_chunks",
        "_pending",
        "_suffix",
        "delimiter",
        "max_line_length",
    )

    def __init__(self, max_line_length: int, delimiter: bytes = LF) -> None:
        if max_line_length < 1:
            raise ValueError("max_line_length must be at least 1")
        if not delimiter:
            raise ValueError("the delimiter must not be empty")
        self.max_line_length = max_line_length
        self.delimiter = delimiter
        self._chunks: list[bytes] = _NO_CHUNKS
        self._pending = 0
        #: The tail's last len(delimiter) - 1 bytes: where a delimiter split
        #: across reads begins (other delimiters than LF only).
        self._suffix = b""

    @property
    def pending(self) -> int:
        """
        The number of bytes of the unterminated tail.
        """
        return self._pending

    @property
    def tail(self) -> bytes:
        """
        The unterminated tail itself (for diagnostics; this joins chunks).
        """
        return b"".join(self._chunks)

    @property
    def _slack(self) -> int:
        """
        Bytes a partial line may hold past the limit: a pending CR before
        LF, or all but the last byte of a longer delimiter.
        """
        return 1 if self.delimiter == LF else len(self.delimiter) - 1

    def take_tail(self) -> bytes:
        """
        Hand over the unterminated tail and forget it (a protocol switching
        to raw mode takes what followed its last line).
        """
        tail = b"".join(self._chunks)
        if self._chunks is not _FAILED:
            self._chunks = _NO_CHUNKS
        self._pending = 0
        self._suffix = b""
        return tail

    def feed(self, data: bytes) -> Frames:
        """
        Add one read's bytes.

        @return: the lines that this read completed and, if a line broke the
            limit, the error; lines before the offending one are returned too.
        """
        if self._chunks is _FAILED:
            return EMPTY
        if self.delimiter != LF:
            return self._feed_other(data)
        end = data.rfind(LF)
        if end < 0:
            return self._hold(data)
        if self._chunks:
            self._chunks.append(data[: end + 1])
            head = b"".join(self._chunks)
        else:
            head = data[: end + 1] if end + 1 < len(data) else data
        rest = data[end + 1 :]
        self._chunks = [rest] if rest else _NO_CHUNKS
        self._pending = len(rest)

        lines = (head.replace(CRLF, LF) if CR in head else head).split(LF)
        lines.pop()
        limit = self.max_line_length
        if max(map(len, lines)) > limit:
            return self._cut(head, lines)
        if self._pending > limit + 1:
            # A further line, still unterminated, is over the limit already.
            self._fail()
            return Frames(lines, head, LineTooLong(len(rest), limit))
        return Frames(lines, head)

    def _feed_other(self, data: bytes) -> Frames:
        """
        L{feed} for a delimiter other than LF, taken exactly, splitting the
        stream as C{bytes.split} would (leftmost first: with C{||}, the
        stream C{a|||} is the line C{a} and the tail C{|}).

        A delimiter can only complete in the tail's last C{len - 1} bytes
        plus this read, so only those are searched while a line grows;
        the tail is joined once, when a delimiter is found.
        """
        delimiter = self.delimiter
        if delimiter not in (self._suffix + data if self._suffix else data):
            if len(delimiter) > 1:
                self._suffix = (self._suffix + data)[1 - len(delimiter) :]
            return self._hold(data)
        whole = b"".join(self._chunks) + data if self._chunks else data
        lines = whole.split(delimiter)
        rest = lines.pop()
        head = whole[: len(whole) - len(rest)]
        self._chunks = [rest] if rest else _NO_CHUNKS
        self._pending = len(rest)
        self._suffix = rest[1 - len(delimiter) :] if len(delimiter) > 1 else b""
        limit = self.max_line_length
        if max(map(len, lines)) > limit:
            return self._cut(head, lines)
        if self._pending > limit + self._slack:
            self._fail()
            return Frames(lines, head, LineTooLong(len(rest), limit))
        return Frames(lines, head)

    def _hold(self, data: bytes) -> Frames:
        if not data:
            return EMPTY
        if self._chunks:
            self._chunks.append(data)
        else:
            self._chunks = [data]
        self._pending += len(data)
        if self._pending > self.max_line_length + self._slack:
            length = self._pending
            self._fail()
            return Frames(_NOTHING, b"", LineTooLong(length, self.max_line_length))
        return EMPTY

    def _cut(self, head: bytes, lines: list[bytes]) -> Frames:
        """
        Keep the lines before the first over-long one; the error path only.
        """
        limit = self.max_line_length
        bad = next(i for i, line in enumerate(lines) if len(line) > limit)
        offset = 0
        delimiter = self.delimiter
        for _ in range(bad):
            offset = head.index(delimiter, offset) + len(delimiter)
        self._fail()
        return Frames(lines[:bad], head[:offset], LineTooLong(len(lines[bad]), limit))

    def _fail(self) -> None:
        self._chunks = _FAILED
        self._pending = 0
        self._suffix = b""
