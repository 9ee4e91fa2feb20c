"""fuseflow.packing: first-fit-decreasing rows and restarted position ids, against slow references."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuseflow.packing import is_varlen, pack_rows, packed_positions, row_capacity, row_layout


def ffd_reference(lengths: list[int], capacity: int) -> list[list[int]]:
    """First fit decreasing written out plainly: longest first (stable), each into the first row with room."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    used: list[int] = []
    for i in order:
        for r, u in enumerate(used):  # an oversized sequence's row (u > capacity) takes nothing more
            if u + lengths[i] <= capacity:
                rows[r].append(i)
                used[r] += lengths[i]
                break
        else:
            rows.append([i])
            used.append(lengths[i])
    return rows


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 60), max_size=40), st.integers(1, 80))
def test_pack_rows_is_ffd_and_covers_every_index_once(lengths, capacity):
    rows = pack_rows(lengths, capacity)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    for row in rows:
        total = sum(lengths[i] for i in row)
        assert total <= capacity or len(row) == 1  # only a sequence longer than a row sits alone over it
    assert rows == ffd_reference(lengths, capacity)


def test_pack_rows_fills_rows():
    # 900 fills a row; 500 + 300 + 100 fill the next; 80 + 20 open a third.
    assert pack_rows([900, 500, 300, 100, 80, 20], 900) == [[0], [1, 2, 3], [4, 5]]
    assert pack_rows([], 10) == []


@pytest.mark.parametrize("bad", [0, -3])
def test_pack_rows_rejects_bad_capacity(bad):
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        pack_rows([1, 2], bad)


def test_pack_rows_rejects_negative_lengths():
    with pytest.raises(ValueError, match="lengths must be >= 0, got -1 at index 1"):
        pack_rows([3, -1], 4)


@given(st.lists(st.integers(0, 30), max_size=20))
def test_packed_positions_restart_per_sequence(lengths):
    want = [p for n in lengths for p in range(n)]
    assert packed_positions(lengths).tolist() == want


def test_row_capacity_depends_on_the_kernel():
    assert row_capacity([5, 120, 40], "sdpa", 4096) == 120  # dense mask: never longer than the longest
    assert row_capacity([5, 120, 40], None, 4096) == 120
    assert row_capacity([5, 120, 40], "flash_attention_2", 4096) == 4096
    assert row_capacity([5, 9000], "flex_attention", 4096) == 9000  # a sequence over budget still fits
    assert is_varlen("flash_attention_2") and not is_varlen("sdpa") and not is_varlen(None)


def test_row_layout_marks_real_positions_and_restarts():
    real, positions = row_layout([3, 2, 4, 1], [2, 2])  # rows: [3, 2] and [4, 1]
    assert real.tolist() == [[True] * 5, [True] * 5]
    assert positions.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    real, positions = row_layout([4, 2], [1, 1])  # the second row is padded: its tail restarts as well
    assert real.tolist() == [[True] * 4, [True, True, False, False]]
    assert positions.tolist() == [[0, 1, 2, 3], [0, 1, 0, 1]]
