"""The offset ledger commits only the contiguous finished prefix of each partition."""

from __future__ import annotations

from aiokafka import TopicPartition

from vlmq.worker.ledger import OffsetLedger

P0, P1 = TopicPartition("jobs", 0), TopicPartition("jobs", 1)


def test_out_of_order_completion_commits_only_the_finished_prefix() -> None:
    ledger = OffsetLedger()
    for off in (10, 11, 12, 13):
        ledger.track(P0, off)
    ledger.done(P0, 12)
    ledger.done(P0, 11)
    assert ledger.to_commit() == {}  # 10 is still running: nothing may be committed
    ledger.done(P0, 10)
    assert ledger.to_commit() == {P0: 13}  # the next offset to read, all before it done
    ledger.done(P0, 13)
    assert ledger.to_commit() == {P0: 14}
    assert ledger.partitions[P0].in_flight == 0


def test_partitions_are_independent_and_can_be_asked_for_alone() -> None:
    ledger = OffsetLedger()
    ledger.track(P0, 0)
    ledger.track(P1, 5)
    ledger.track(P1, 6)
    ledger.done(P1, 5)
    assert ledger.to_commit() == {P1: 6}
    assert ledger.to_commit({P0}) == {}
    ledger.done(P0, 0)
    assert ledger.to_commit({P0}) == {P0: 1}


def test_repeated_commits_send_only_what_moved() -> None:
    ledger = OffsetLedger()
    ledger.track(P0, 0)
    ledger.done(P0, 0)
    offsets = ledger.to_commit()
    ledger.committed(offsets)
    assert ledger.to_commit() == {}  # committed already: no second commit of the same offset
    ledger.committed(offsets)  # a repeated acknowledgement changes nothing
    assert ledger.to_commit() == {}
    ledger.track(P0, 1)
    ledger.done(P0, 1)
    assert ledger.to_commit() == {P0: 2}


def test_a_revoked_partition_is_dropped_and_late_completions_ignored() -> None:
    ledger = OffsetLedger()
    ledger.track(P0, 0)
    ledger.track(P1, 0)
    ledger.drop({P0})
    ledger.done(P0, 0)  # the new owner redoes it: this worker must not commit it
    ledger.done(P1, 0)
    assert ledger.to_commit() == {P1: 1}
    ledger.committed({P0: 1})  # a commit answer for a dropped partition is ignored too
    assert P0 not in ledger.partitions


def test_position_is_past_every_offset_handed_out_finished_or_not() -> None:
    """After a rebalance that leaves a partition here, reading resumes at `position`: the
    jobs still in flight are not delivered a second time."""
    ledger = OffsetLedger()
    assert ledger.position(P0) is None  # nothing read here: the group's commit decides
    for off in (10, 11, 14):  # offsets need not be contiguous (compaction, markers)
        ledger.track(P0, off)
    ledger.done(P0, 11)
    assert ledger.position(P0) == 15
    assert ledger.to_commit() == {}  # 10 still runs: resuming at 15 commits nothing early
    ledger.done(P0, 10)
    assert ledger.to_commit() == {P0: 12}
    ledger.drop({P0})
    assert ledger.position(P0) is None
