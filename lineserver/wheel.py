"""One coarse timer for many connections' deadlines.

A C{DelayedCall} per connection costs ~430 bytes (the call, its bound
method and arguments, the dict that holds it) and a C{callLater} and a
C{cancel} per connection; with ten thousand idle connections that is
4 MB and a heap of ten thousand entries for deadlines that, but for a few,
never fire.  A L{DeadlineWheel} keeps owners in buckets of C{granularity}
seconds and holds one C{DelayedCall}, for its earliest bucket: an owner
costs one set entry.  A deadline fires at the first bucket boundary at or
after it, so at most C{granularity} seconds late, never early.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Generic, TypeVar

from twisted.internet.interfaces import IDelayedCall, IReactorTime

T = TypeVar("T")

#: Float slack when placing a deadline that falls on a boundary exactly.
_EPSILON = 1e-9


class Bucket(set[T]):
    """
    The owners whose deadline falls in one slot of the wheel; an owner
    keeps its bucket to cancel.
    """

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index


class DeadlineWheel(Generic[T]):
    """
    Deadlines of many owners on one timer, to C{granularity} seconds.

    @ivar granularity: the width of a bucket in seconds: the most a
        deadline may fire late.
    """

    __slots__ = (
        "_buckets",
        "_call",
        "_call_index",
        "_clock",
        "_expire",
        "granularity",
    )

    def __init__(
        self, clock: IReactorTime, granularity: float, expire: Callable[[T], object]
    ) -> None:
        """
        @param expire: called with each owner whose deadline came, once;
            the owner is out of the wheel by then.
        """
        if not granularity > 0:
            raise ValueError(f"granularity must be positive, got {granularity!r}")
        self._clock = clock
        self.granularity = granularity
        self._expire = expire
        self._buckets: dict[int, Bucket[T]] = {}
        self._call: IDelayedCall | None = None
        self._call_index = 0

    def __len__(self) -> int:
        """
        @return: how many owners wait.
        """
        return sum(len(bucket) for bucket in self._buckets.values())

    def schedule(self, owner: T, delay: float) -> Bucket[T]:
        """
        Call C{expire(owner)} C{delay} seconds from now, or up to
        C{granularity} later.

        @return: the bucket, for L{cancel}.
        """
        now = self._clock.seconds()
        granularity = self.granularity
        index = math.ceil((now + delay) / granularity - _EPSILON)
        buckets = self._buckets
        bucket = buckets.get(index)
        if bucket is None:
            bucket = buckets[index] = Bucket(index)
        bucket.add(owner)
        call = self._call
        if call is None or index < self._call_index:
            if call is not None:
                call.cancel()
            self._call_index = index
            self._call = self._clock.callLater(
                max(0.0, index * granularity - now), self._fire
            )
        return bucket

    def cancel(self, owner: T, bucket: Bucket[T]) -> None:
        """
        Forget C{owner}'s deadline (in C{bucket}, from L{schedule}); the
        timer goes once no owner is left, so that an idle wheel holds none.
        """
        bucket.discard(owner)
        if bucket or self._buckets.get(bucket.index) is not bucket:
            return
        del self._buckets[bucket.index]
        if not self._buckets and self._call is not None:
            self._call.cancel()
            self._call = None

    def _fire(self) -> None:
        self._call = None
        now = self._clock.seconds()
        limit = (now + _EPSILON) / self.granularity
        buckets = self._buckets
        for index in sorted(index for index in buckets if index <= limit):
            bucket = buckets.pop(index)
            for owner in list(bucket):
                if owner in bucket:  # not cancelled by an earlier expiry
                    bucket.discard(owner)
                    self._expire(owner)
        if buckets and self._call is None:
            index = min(buckets)
            self._call_index = index
            self._call = self._clock.callLater(
                max(0.0, index * self.granularity - now), self._fire
            )
