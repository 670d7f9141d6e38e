"""One coarse timer for many connections' deadlines.

A C{DelayedCall} per connection costs ~430 bytes (the call, its bound
method and arguments, the dict that holds it) and a C{callLater} and a
C{cancel} per connection; with ten thousand idle connections that is
4 MB and a heap of ten thousand entries for deadlines that, but for a few,
never fire.  A L{DeadlineWheel} keeps owners in buckets of C{granularity}
seconds and holds one C{DelayedCall}, for its earliest bucket.  A deadline
fires at the first bucket boundary at or after it, so at most
C{granularity} seconds late, never early.

A bucket is a list (8 bytes an owner; a set cost 30 to 80, by its fill):
an owner keeps its bucket, which is how the wheel tells a live entry from
a cancelled one (the owner's bucket is no longer that one).  Cancelled
entries stay in the list until it fires, or until they outnumber half the
live ones, when the list is compacted: the dead owners a bucket keeps
alive are at most half its live ones, plus a few.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Generic, TypeVar

from twisted.internet.interfaces import IDelayedCall, IReactorTime

T = TypeVar("T")

#: Float slack when placing a deadline that falls on a boundary exactly.
_EPSILON = 1e-9

#: Cancelled entries a bucket may hold beyond half its live ones.
_SLACK = 8


class Bucket(list[T]):
    """
    The owners whose deadline falls in one slot of the wheel (and some
    that cancelled theirs); an owner keeps its bucket to cancel.

    @ivar number: its slot on the wheel (its start over the granularity).
    @ivar live: the owners in it whose deadline still stands.
    """

    __slots__ = ("live", "number")

    def __init__(self, index: int) -> None:
        super().__init__()
        self.number = index
        self.live = 0


class DeadlineWheel(Generic[T]):
    """
    Deadlines of many owners on one timer, to C{granularity} seconds.

    @ivar granularity: the width of a bucket in seconds: the most a
        deadline may fire late.
    """

    __slots__ = (
        "_bucket_of",
        "_buckets",
        "_call",
        "_call_index",
        "_clock",
        "_expire",
        "granularity",
    )

    def __init__(
        self,
        clock: IReactorTime,
        granularity: float,
        expire: Callable[[T], object],
        bucket_of: Callable[[T], Bucket[T] | None],
    ) -> None:
        """
        @param expire: called with each owner whose deadline came, once;
            it must forget its bucket (its deadline is over).
        @param bucket_of: the bucket an owner keeps (from L{schedule}),
            or None once it cancelled or expired.
        """
        if not granularity > 0:
            raise ValueError(f"granularity must be positive, got {granularity!r}")
        self._clock = clock
        self.granularity = granularity
        self._expire = expire
        self._bucket_of = bucket_of
        self._buckets: dict[int, Bucket[T]] = {}
        self._call: IDelayedCall | None = None
        self._call_index = 0

    def __len__(self) -> int:
        """
        @return: how many owners wait.
        """
        return sum(bucket.live for bucket in self._buckets.values())

    def schedule(self, owner: T, delay: float) -> Bucket[T]:
        """
        Call C{expire(owner)} C{delay} seconds from now, or up to
        C{granularity} later.  The owner keeps the bucket returned (for
        C{bucket_of} and L{cancel}); it may hold one deadline at a time.

        @return: the bucket.
        """
        now = self._clock.seconds()
        granularity = self.granularity
        index = math.ceil((now + delay) / granularity - _EPSILON)
        buckets = self._buckets
        bucket = buckets.get(index)
        if bucket is None:
            bucket = buckets[index] = Bucket(index)
        bucket.append(owner)
        bucket.live += 1
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
        owner then forgets its bucket.  The timer goes once no owner is
        left, so that an idle wheel holds none.
        """
        bucket.live -= 1
        if self._buckets.get(bucket.number) is not bucket:
            return  # firing: its owners are checked one by one
        if bucket.live <= 0:
            del self._buckets[bucket.number]
            bucket.clear()
            if not self._buckets and self._call is not None:
                self._call.cancel()
                self._call = None
        elif len(bucket) - bucket.live > bucket.live // 2 + _SLACK:
            bucket_of = self._bucket_of
            bucket[:] = [
                other
                for other in bucket
                if other is not owner and bucket_of(other) is bucket
            ]

    def _fire(self) -> None:
        self._call = None
        now = self._clock.seconds()
        limit = (now + _EPSILON) / self.granularity
        buckets = self._buckets
        bucket_of = self._bucket_of
        for index in sorted(index for index in buckets if index <= limit):
            bucket = buckets.pop(index)
            for owner in bucket:
                # Not cancelled (by an earlier expiry, too), nor a second
                # entry of an owner that expired already.
                if bucket_of(owner) is bucket:
                    self._expire(owner)
        if buckets and self._call is None:
            index = min(buckets)
            self._call_index = index
            self._call = self._clock.callLater(
                max(0.0, index * self.granularity - now), self._fire
            )
