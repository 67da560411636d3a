"""Packing collator: first-fit-decreasing against hand-made cases, shifted targets, cu_seqlens, errors."""

import pytest
import torch

from fastpref.data.packing import collate_padded, first_fit_decreasing, pack_examples


def _ex(n, prompt, start=0):
    ids = list(range(start, start + n))
    return {"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]}


def test_ffd_hand_made():
    # sorted: 7(i1) 5(i0) 4(i3) 3(i2) 2(i4) 1(i5); budget 10
    # 7 -> bin0 (room 3); 5 -> bin1 (room 5); 4 -> bin1 (room 1); 3 -> bin0 (room 0); 2 -> bin2; 1 -> bin1
    assert first_fit_decreasing([5, 7, 3, 4, 2, 1], 10) == [[1, 2], [0, 3, 5], [4]]
    assert first_fit_decreasing([4, 4, 4], 4) == [[0], [1], [2]]
    assert first_fit_decreasing([1, 1, 1], 100) == [[0, 1, 2]]


def test_sft_pack_targets_positions_cu():
    exs = [_ex(4, 2, 0), _ex(3, 1, 10), _ex(6, 3, 20)]
    (b,) = pack_examples(exs, 13)
    # units kept in input order within the bin
    assert b.seq_index.tolist() == [0, 1, 2]
    assert b.input_ids.tolist() == [[0, 1, 2, 3, 10, 11, 12, 20, 21, 22, 23, 24, 25]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 5]]
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens.tolist() == [0, 4, 7, 13]
    assert b.max_seqlen == 6 and b.unit_bounds == (0, 4, 7, 13)
    # targets[t] = labels[t + 1]; -100 at each sequence's last token
    assert b.targets.tolist() == [-100, 2, 3, -100, 11, 12, -100, -100, -100, 23, 24, 25, -100]


def test_pairs_and_groups_stay_together():
    exs = [_ex(3, 1), _ex(5, 1), _ex(2, 1), _ex(2, 1), _ex(6, 1), _ex(1, 0)]  # pairs: 8, 4, 7 tokens
    bs = pack_examples(exs, 12, unit_size=2)
    # FFD over units [8, 4, 7]: 8 -> bin0; 7 -> bin1; 4 -> bin0 (room 4)
    assert [b.seq_index.tolist() for b in bs] == [[0, 1, 2, 3], [4, 5]]
    assert bs[0].unit_bounds == (0, 8, 12) and bs[0].cu_seqlens.tolist() == [0, 3, 8, 10, 12]
    gs = pack_examples([_ex(2, 1)] * 6, 7, unit_size=3)
    assert [g.seq_index.tolist() for g in gs] == [[0, 1, 2], [3, 4, 5]]
    assert gs[1].unit_bounds == (0, 6) and gs[1].position_ids.tolist() == [[0, 1, 0, 1, 0, 1]]


def test_padded_same_meaning_trl_order():
    exs = [_ex(3, 1, 0), _ex(5, 2, 10), _ex(2, 1, 20), _ex(4, 1, 30)]
    p = collate_padded(exs, pad_id=99, unit_size=2)
    assert p.seq_index.tolist() == [0, 2, 1, 3]  # chosen rows first
    packed = pack_examples(exs, 100, unit_size=2)[0]
    for row, e in enumerate(p.seq_index.tolist()):
        i = packed.seq_index.tolist().index(e)
        a, b = packed.cu_seqlens[i].item(), packed.cu_seqlens[i + 1].item()
        n = b - a
        assert p.input_ids[row, :n].tolist() == packed.input_ids[0, a:b].tolist()
        assert p.targets[row, :n].tolist() == packed.targets[a:b].tolist()
        assert p.position_ids[row, :n].tolist() == packed.position_ids[0, a:b].tolist()
        assert (p.targets[row, n:] == -100).all() and (p.input_ids[row, n:] == 99).all()
        assert p.attention_mask[row].sum() == n


def test_to_device_moves_cu_and_keeps_the_host_copy():
    b = pack_examples([_ex(3, 1)], 8)[0]
    assert b.cu_seqlens_host == (0, 3) and b.packed and b.num_seqs == 1 and b.num_tokens == 3
    moved = b.to("cpu")
    assert moved.cu_seqlens.device.type == "cpu" and moved.cu_seqlens_host == (0, 3)
    assert moved.scored_lengths.tolist() == [2]  # targets [1, 2, -100]


@pytest.mark.parametrize("exs,kw,match", [
    ([_ex(3, 1), {"input_ids": [], "labels": []}], {}, "example 1: empty"),
    ([_ex(3, 1), _ex(9, 1)], {}, "example 1: 9 tokens > max_tokens=8"),
    ([_ex(3, 1), _ex(6, 1)], {"unit_size": 2}, r"examples 0..1 \(one unit\): 9 tokens"),
    ([_ex(3, 1), _ex(3, 1), _ex(3, 1)], {"unit_size": 2}, "not a multiple of unit_size"),
    ([{"input_ids": [1, 2], "labels": [1]}], {}, "example 0: labels has 1"),
    ([{"input_ids": [1, 2]}], {}, "example 0: needs"),
])
def test_errors(exs, kw, match):
    with pytest.raises(ValueError, match=match):
        pack_examples(exs, 8, **kw)
