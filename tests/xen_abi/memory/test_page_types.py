"""PageTypes as pyvmm's writers use it: writable references taken and
dropped with compare-and-swap on the words the shim shares, page tables
refused, a broken word reported without stopping the writer."""
from __future__ import annotations

import logging
import threading

import pytest

from pyvmm.xen_abi.memory.page_types import (
    PGT_COUNT_MASK,
    PGT_L1,
    PGT_L2,
    PGT_L4,
    PGT_PINNED,
    PGT_TYPE_SHIFT,
    PGT_WRITABLE,
    NotWritable,
    TypeWordError,
)
from typewords import TypeWords

RAM_PAGES = 64
WRITABLE = PGT_WRITABLE << PGT_TYPE_SHIFT


def table(level: int, count: int = 1, pinned: bool = False) -> int:
    return level << PGT_TYPE_SHIFT | count | (PGT_PINNED if pinned else 0)


@pytest.fixture
def words():
    w = TypeWords(RAM_PAGES)
    yield w
    w.close()


def test_take_and_drop_count_writable_references(words):
    pt = words.page_types
    assert pt.take_writable(5) and pt.word(5) == WRITABLE | 1
    assert pt.take_writable(5) and pt.word(5) == WRITABLE | 2
    assert pt.in_use(5)
    pt.drop_writable(5)
    assert pt.word(5) == WRITABLE | 1
    pt.drop_writable(5)
    # count 0 keeps the type: the shim flushes only on a change of type
    assert pt.word(5) == WRITABLE and not pt.in_use(5)


# a table with no references left too: only the shim can flush what the
# vCPUs may still cache of it, so pyvmm never takes such a frame over
@pytest.mark.parametrize("word", [table(PGT_L1), table(PGT_L2, 3), table(PGT_L4, 1, pinned=True),
                                  table(PGT_L1, 0)])
def test_a_page_table_is_refused_and_left_alone(words, word):
    words.set(7, word)
    pt = words.page_types
    assert not pt.take_writable(7)
    assert pt.word(7) == word


def test_a_full_count_is_refused(words):
    words.set(3, WRITABLE | PGT_COUNT_MASK)
    assert not words.page_types.take_writable(3)
    assert words.page_types.word(3) == WRITABLE | PGT_COUNT_MASK


def test_frames_beyond_ram_have_no_word(words):
    pt = words.page_types
    assert pt.is_ram(RAM_PAGES - 1) and not pt.is_ram(RAM_PAGES) and not pt.is_ram(-1)
    with pytest.raises(ValueError):
        pt.take_writable(RAM_PAGES)


def test_dropping_what_is_not_held_raises(words):
    with pytest.raises(TypeWordError):
        words.page_types.drop_writable(9)
    words.set(9, table(PGT_L1))
    with pytest.raises(TypeWordError) as e:
        words.page_types.drop_writable(9)
    assert (e.value.mfn, e.value.word) == (9, table(PGT_L1))
    assert words.page_types.word(9) == table(PGT_L1)


def test_two_threads_hammering_one_word_end_at_zero(words):
    pt = words.page_types
    rounds = 20000
    start = threading.Barrier(2)
    refused = []

    def hammer():
        start.wait()
        for _ in range(rounds):
            if not pt.take_writable(11):
                refused.append(pt.word(11))
                return
            pt.drop_writable(11)

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert refused == [] and pt.word(11) == WRITABLE


def test_release_writable_logs_a_broken_word_once_and_goes_on(words, caplog):
    pt = words.page_types
    assert pt.take_writable(12)
    words.set(12, table(PGT_L1))          # the guest, through a subverted shim
    with caplog.at_level(logging.ERROR):
        pt.release_writable(12, "test writer")
        pt.release_writable(12, "test writer")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "test writer" in lines[0] and "0xc" in lines[0] and "L1 x1" in lines[0]
    assert pt.word(12) == table(PGT_L1)


def test_take_all_writable_is_all_or_none(words):
    pt = words.page_types
    words.set(4, table(PGT_L2))
    with pytest.raises(NotWritable) as e:
        pt.take_all_writable([1, 2, 4, 6])
    assert e.value.mfn == 4
    assert [pt.word(f) for f in (1, 2, 4, 6)] == [WRITABLE, WRITABLE, table(PGT_L2), 0], "taken ones given back"
    assert pt.take_all_writable([1, RAM_PAGES + 5, 2]) == (1, 2), "frames beyond RAM are left out"
    assert pt.word(1) == pt.word(2) == WRITABLE | 1


def test_writing_holds_the_frames_for_the_block(words):
    pt = words.page_types
    with pt.writing([20, 21], "test"):
        assert pt.word(20) == pt.word(21) == WRITABLE | 1
    assert pt.word(20) == pt.word(21) == WRITABLE
    with pytest.raises(RuntimeError):
        with pt.writing([22], "test"):
            raise RuntimeError("the write failed")
    assert pt.word(22) == WRITABLE
    words.set(23, table(PGT_L1))
    with pytest.raises(NotWritable):
        with pt.writing([22, 23], "test"):
            pytest.fail("wrote into a page table")
    assert pt.word(22) == WRITABLE and pt.word(23) == table(PGT_L1)


def test_discard_if_unused(words):
    pt = words.page_types
    discarded = []
    assert pt.take_writable(30)
    assert not pt.discard_if_unused(30, lambda: discarded.append(30))
    pt.drop_writable(30)
    assert pt.discard_if_unused(30, lambda: discarded.append(30))
    assert discarded == [30]


def test_no_take_gets_in_while_a_frame_is_discarded(words):
    """Reservation discards a released frame it found unused: a back-end
    thread taking it meanwhile waits until the discard is done."""
    pt = words.page_types
    trying, taken = threading.Event(), threading.Event()

    def take():
        trying.set()
        pt.take_writable(31)
        taken.set()

    t = threading.Thread(target=take)

    def discard():
        t.start()
        trying.wait()
        # the taker is blocked until discard returns: it cannot be done now
        assert not taken.wait(0.2)

    assert pt.discard_if_unused(31, discard)
    t.join()
    assert taken.is_set() and pt.word(31) == WRITABLE | 1
