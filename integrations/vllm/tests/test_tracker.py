"""PromptTracker: per-request prompt lengths from per-step batch rows (no engine needed)."""

from omnikv_vllm.tracker import PromptTracker, RowState

BS = 4


def table(*rows):
    return [list(r) for r in rows]


def test_prefill_then_decode_keeps_the_prompt_length_across_blocks():
    t = PromptTracker(BS)
    # A 6-token prompt in blocks [7, 9]: positions 0-3 in 7, 4-5 in 9.
    assert t.step([6], [6], [True], table([7, 9, 11])) == [RowState(False, 6)]
    for s in range(7, 14):  # decode: position 8 opens block 11 (s = 9), then 12 opens block 13
        out = t.step([1], [s], [False], table([7, 9, 11, 13]))
        assert out == [RowState(True, 6)], s


def test_chunked_prefill_and_mixed_rows():
    t = PromptTracker(BS)
    # Row 0 prefills 10 tokens in two chunks while row 1 prefills then decodes.
    assert t.step([5, 3], [5, 3], [True, True], table([1, 2, 3], [4, 5])) == [RowState(False, 5), RowState(False, 3)]
    out = t.step([5, 1], [10, 4], [True, False], table([1, 2, 3], [4, 5]))
    assert out == [RowState(False, 10), RowState(True, 3)]
    out = t.step([1, 1], [11, 5], [False, False], table([1, 2, 3], [4, 5]))
    assert out == [RowState(True, 10), RowState(True, 3)]


def test_one_token_prefill_is_not_a_decode_step():
    # Prefix caching: the whole prompt but its last token hit the cache; the 1-token step is still
    # prefill (is_prefilling), and its length is the prompt length.
    t = PromptTracker(BS)
    assert t.step([1], [9], [True], table([3, 4, 5])) == [RowState(False, 9)]
    assert t.step([1], [10], [False], table([3, 4, 5])) == [RowState(True, 9)]


def test_a_later_multi_token_step_extends_the_prompt():
    # As in the library: tokens recomputed after preemption (or a new turn) join the prompt.
    t = PromptTracker(BS)
    t.step([5], [5], [True], table([1, 2]))
    t.step([1], [6], [False], table([1, 2]))
    assert t.step([7], [7], [False], table([8, 9])) == [RowState(False, 7)]
    assert t.step([1], [8], [False], table([8, 9])) == [RowState(True, 7)]


def test_stale_entries_of_freed_blocks_are_not_used():
    t = PromptTracker(BS)
    t.step([6], [6], [True], table([5, 6]))  # request A: entry on block 6 at s=6
    # Request B reuses block 6 but its history is unknown to the tracker (e.g. an engine restart
    # of this builder); its decode at s=10 must not take A's prompt length.
    assert t.step([1], [10], [False], table([0, 0, 6])) == [RowState(True, None)]


def test_padding_rows_and_missing_is_prefilling():
    t = PromptTracker(BS)
    assert t.step([3, 0], [3, 0], None, table([1], [0])) == [RowState(False, 3), None]
    assert t.step([1], [4], None, table([1])) == [RowState(True, 3)]


def test_a_step_built_twice_gives_the_same_answer():
    t = PromptTracker(BS)
    t.step([3], [3], [True], table([1, 2]))
    first = t.step([1], [4], [False], table([1, 2]))
    assert t.step([1], [4], [False], table([1, 2])) == first == [RowState(True, 3)]
