"""Which offsets may be committed: only the contiguous prefix of finished messages.

Work finishes out of order (a short caption overtakes a long one), but committing offset
N tells Kafka everything before N is done. Per partition we keep the offsets handed out,
in order, and advance the commit point only over a finished prefix: a worker that dies
loses nothing, and at most re-runs what was unfinished (the Redis claim skips ended jobs).
"""

from __future__ import annotations

from collections import deque

from aiokafka import TopicPartition


class PartitionLedger:
    __slots__ = ("_done", "_pending", "committable", "committed", "position")

    def __init__(self) -> None:
        self._pending: deque[int] = deque()
        self._done: set[int] = set()
        self.committable: int | None = None  # next offset to consume, all before it finished
        self.committed: int | None = None
        self.position: int | None = None  # the offset after the last one handed out

    def track(self, offset: int) -> None:
        self._pending.append(offset)
        self.position = offset + 1

    def done(self, offset: int) -> None:
        self._done.add(offset)
        while self._pending and self._pending[0] in self._done:
            first = self._pending.popleft()
            self._done.discard(first)
            self.committable = first + 1

    @property
    def in_flight(self) -> int:
        return len(self._pending)


class OffsetLedger:
    def __init__(self) -> None:
        self.partitions: dict[TopicPartition, PartitionLedger] = {}

    def track(self, tp: TopicPartition, offset: int) -> None:
        self.partitions.setdefault(tp, PartitionLedger()).track(offset)

    def done(self, tp: TopicPartition, offset: int) -> None:
        ledger = self.partitions.get(tp)
        if ledger is not None:  # None: revoked meanwhile; the new owner redoes it
            ledger.done(offset)

    def to_commit(self, tps: set[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """Offsets that moved since the last commit (for `tps`, or all partitions)."""
        return {
            tp: p.committable
            for tp, p in self.partitions.items()
            if (tps is None or tp in tps) and p.committable is not None and p.committable != p.committed
        }

    def position(self, tp: TopicPartition) -> int | None:
        """Where this worker's reading of `tp` stands: every offset before it is handed out
        here (finished, or in flight) or was committed."""
        ledger = self.partitions.get(tp)
        return ledger.position if ledger is not None else None

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, off in offsets.items():
            if tp in self.partitions:
                self.partitions[tp].committed = off

    def drop(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            self.partitions.pop(tp, None)
