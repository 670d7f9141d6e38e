"""Counters and gauges that tests, logs and a metrics endpoint can read.

One L{Stats} per server.  Counters only go up; gauges are read from
callables at snapshot time, so nothing has to remember to update them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping


class Stats:
    """
    A server's counters (monotonic) and gauges (sampled on read).

    Names are dotted lower-case words, like C{lines.accepted} or
    C{accept.errors.EMFILE}; they are listed in C{docs/operations.md}.
    """

    def __init__(self) -> None:
        self._counters: Counter[str] = Counter()
        self._gauges: dict[str, Callable[[], int]] = {}

    def incr(self, name: str, amount: int = 1) -> None:
        self._counters[name] += amount

    def get(self, name: str) -> int:
        """
        @return: the counter's value, or a gauge's current value, or 0.
        """
        gauge = self._gauges.get(name)
        if gauge is not None:
            return gauge()
        return self._counters[name]

    def add_gauge(self, name: str, read: Callable[[], int]) -> None:
        self._gauges[name] = read

    def snapshot(self) -> Mapping[str, int]:
        """
        @return: every counter and gauge, by name, as of now.
        """
        values = dict(self._counters)
        for name, read in self._gauges.items():
            values[name] = read()
        return values
