"""teacher/sequence.py: token / position layout, seeded orders and reveals, first-logits and 4-code sequences."""
import pytest
import torch

from teacher.sequence import (RELEASED_RGB, Seq, TokenLayout, build_first_logits_sequence, build_full_sequence,
                              move_last, num_revealed, patchify_codes, sample_reveal, shuffle_orders)

torch.set_num_threads(1)

# A 2x2-patch layout: codes [0, 16), frame-0 pointers [16, 20), frame-1 pointers [20, 24), positions 0..19 / 20..39
TINY = TokenLayout.for_sizes(n_codes=16, grid=2, codes_per_side=2)


def _codes():
    c0 = torch.tensor([[[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]])    # [1, 4, 4]
    c1 = torch.tensor([[[15, 14, 13, 12], [11, 10, 9, 8], [7, 6, 5, 4], [3, 2, 1, 0]]])
    return c0, c1


def test_tiny_layout_fields():
    assert (TINY.ptr0_offset, TINY.ptr1_offset, TINY.pos0_offset, TINY.pos1_offset) == (16, 20, 0, 20)
    assert TINY.tokens_per_patch == 5 and TINY.num_patches == 4
    assert TINY.vocab_size == 24 and TINY.block_size == 40


def test_first_logits_sequence_exact_layout():
    c0, c1 = _codes()
    reveal = torch.tensor([False, True, False, False])
    order0 = torch.tensor([2, 0, 3, 1])
    order1 = torch.tensor([3, 1, 0, 2])
    seq = build_first_logits_sequence(c0, c1, reveal, order0, order1, TINY)
    # frame 0 in order0: patch 2, 0, 3, 1 -> [16 + p, codes], positions 5p + slot
    idx0 = [18, 8, 9, 10, 11, 16, 0, 1, 2, 3, 19, 12, 13, 14, 15, 17, 4, 5, 6, 7]
    pos0 = [10, 11, 12, 13, 14, 0, 1, 2, 3, 4, 15, 16, 17, 18, 19, 5, 6, 7, 8, 9]
    # revealed frame-1 patches in order1 order: only patch 1 -> [20 + 1, codes1[1]], positions 20 + 5 + slot
    idx1 = [21, 11, 10, 9, 8]
    pos1 = [25, 26, 27, 28, 29]
    # masked pointers in order1 order: patches 3, 0, 2 -> 20 + p at position 20 + 5p
    idxm = [23, 20, 22]
    posm = [35, 20, 30]
    assert seq.idx.tolist() == [idx0 + idx1 + idxm]
    assert seq.pos.tolist() == [pos0 + pos1 + posm]
    assert seq.frame0_len == 20 and seq.length == 28
    assert seq.masked.tolist() == [3, 0, 2]
    assert seq.logits_index.tolist() == [25, 26, 27]
    assert seq.targets is None


def test_full_sequence_exact_layout_and_targets():
    c0, c1 = _codes()
    reveal = torch.tensor([False, True, False, False])
    order0, order1 = torch.tensor([2, 0, 3, 1]), torch.tensor([3, 1, 0, 2])
    seq = build_full_sequence(c0, c1, reveal, order0, order1, TINY)
    first = build_first_logits_sequence(c0, c1, reveal, order0, order1, TINY)
    # prefix up to the masked block equals the first-logits sequence
    assert torch.equal(seq.idx[:, :25], first.idx[:, :25]) and torch.equal(seq.pos[:, :25], first.pos[:, :25])
    # masked patches 3, 0, 2 in full: pointer + their four frame-1 codes, positions 20 + 5p + slot
    assert seq.idx[0, 25:].tolist() == [23, 3, 2, 1, 0, 20, 15, 14, 13, 12, 22, 7, 6, 5, 4]
    assert seq.pos[0, 25:].tolist() == [35, 36, 37, 38, 39, 20, 21, 22, 23, 24, 30, 31, 32, 33, 34]
    assert seq.length == 40 and seq.masked.tolist() == [3, 0, 2]
    assert seq.logits_index.tolist() == [25, 30, 35]               # the masked pointers
    # the output at each masked pointer predicts that patch's first code
    assert seq.idx[0, seq.logits_index + 1].tolist() == [c1[0, 3, 0], c1[0, 0, 0], c1[0, 2, 0]]
    # targets: next token where it is a code, -1 where the next token is a pointer (and at the end)
    tgt = seq.targets[0]
    assert tgt[0].item() == 8 and tgt[4].item() == -1 and tgt[-1].item() == -1
    expect = [int(seq.idx[0, t + 1]) if int(seq.idx[0, t + 1]) < 16 else -1 for t in range(39)] + [-1]
    assert tgt.tolist() == expect
    masked_only = build_full_sequence(c0, c1, reveal, order0, order1, TINY, targets="masked").targets[0]
    assert (masked_only[:25] == -1).all()
    assert torch.equal(masked_only[25:], tgt[25:])
    assert int((masked_only >= 0).sum()) == 12                     # 3 masked patches x 4 codes


def test_patchify_codes_row_major_inside_patches():
    codes = torch.arange(16).reshape(1, 4, 4)
    p = patchify_codes(codes, TINY)
    assert p.tolist() == [[[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]]
    with pytest.raises(ValueError, match="codes must be"):
        patchify_codes(torch.zeros(1, 4, 6, dtype=torch.long), TINY)


def test_released_layout_lengths_at_mask_0_9():
    L = RELEASED_RGB
    assert (L.vocab_size, L.block_size, L.num_patches) == (67584, 10240, 1024)
    assert TokenLayout.for_sizes(65536, 32) == L
    reveal = sample_reveal(1024, 0.9, seed=1110)
    assert int(reveal.sum()) == 102 == num_revealed(1024, 0.9)
    g = torch.Generator().manual_seed(0)
    c0 = torch.randint(0, 65536, (1, 1024, 4), generator=g)
    c1 = torch.randint(0, 65536, (1, 1024, 4), generator=g)
    o0, o1 = shuffle_orders(1024, 1110)
    seq = build_first_logits_sequence(c0, c1, reveal, o0, o1, L)
    assert seq.length == 5120 + 5 * 102 + 922 == 6552
    assert seq.logits_index.numel() == 922 and seq.masked.numel() == 922
    assert (seq.idx[0, seq.logits_index] == 66560 + seq.masked).all()
    assert seq.pos.max() < L.block_size and seq.idx.max() < L.vocab_size
    # every position id appears once; a pointer's position encodes the same patch as its value
    assert seq.pos[0].unique().numel() == seq.length
    ptr = seq.idx[0] >= 65536
    frame1 = seq.idx[0] >= 66560
    p_from_value = torch.where(frame1, seq.idx[0] - 66560, seq.idx[0] - 65536)[ptr]
    p_from_pos = torch.where(frame1, (seq.pos[0] - 5120) // 5, seq.pos[0] // 5)[ptr]
    assert torch.equal(p_from_value, p_from_pos)
    assert ((seq.pos[0][ptr] - torch.where(frame1[ptr], 5120, 0)) % 5 == 0).all()
    # the tiny preset layout
    tiny = TokenLayout.for_sizes(256, 8)
    assert (tiny.ptr0_offset, tiny.ptr1_offset, tiny.pos1_offset, tiny.vocab_size, tiny.block_size) == \
        (256, 320, 320, 384, 640)


def test_seeded_reveal_and_shuffles():
    for P, ratio in ((1024, 0.9), (64, 0.9), (64, 0.5), (100, 0.7)):
        r = sample_reveal(P, ratio, 3)
        assert r.dtype == torch.bool and r.shape == (P,) and int(r.sum()) == int(P * (1 - ratio))
    assert torch.equal(sample_reveal(1024, 0.9, 5), sample_reveal(1024, 0.9, 5))
    assert not torch.equal(sample_reveal(1024, 0.9, 5), sample_reveal(1024, 0.9, 6))
    a0, a1 = shuffle_orders(64, 7)
    b0, b1 = shuffle_orders(64, 7)
    assert torch.equal(a0, b0) and torch.equal(a1, b1)
    assert torch.equal(a0.sort().values, torch.arange(64)) and torch.equal(a1.sort().values, torch.arange(64))
    assert not torch.equal(a0, a1)
    c0, _ = shuffle_orders(64, 8)
    assert not torch.equal(a0, c0)
    # identical inputs and seed -> identical sequences
    g = torch.Generator().manual_seed(1)
    layout = TokenLayout.for_sizes(256, 8)
    codes = torch.randint(0, 256, (2, 64, 4), generator=g)
    s1 = build_first_logits_sequence(codes, codes[:1], sample_reveal(64, 0.9, 9), *shuffle_orders(64, 9), layout)
    s2 = build_first_logits_sequence(codes, codes[:1], sample_reveal(64, 0.9, 9), *shuffle_orders(64, 9), layout)
    assert torch.equal(s1.idx, s2.idx) and torch.equal(s1.pos, s2.pos) and s1.idx.shape[0] == 2


def test_move_last_keeps_relative_order():
    order = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])
    out = move_last(order, torch.tensor([3, 5, 1]))
    assert out.tolist() == [2, 7, 0, 6, 4, 5, 3, 1]
    assert move_last(order, torch.tensor([], dtype=torch.long)).tolist() == order.tolist()
    assert move_last(order, torch.tensor([4, 4])).tolist() == [5, 2, 7, 0, 3, 6, 1, 4]
    with pytest.raises(ValueError, match="patch ids"):
        move_last(order, torch.tensor([8]))


def test_clean_and_perturbed_sequences_differ_only_in_changed_codes():
    layout = TokenLayout.for_sizes(256, 8)
    g = torch.Generator().manual_seed(2)
    c0 = torch.randint(0, 256, (1, 64, 4), generator=g)
    c1 = torch.randint(0, 256, (1, 64, 4), generator=g)
    pert = c0.clone()
    pert[0, [9, 10, 17], 0] = (pert[0, [9, 10, 17], 0] + 1) % 256
    reveal = sample_reveal(64, 0.9, 4)
    o0, o1 = shuffle_orders(64, 4)
    o0 = move_last(o0, torch.tensor([9, 10, 17]))
    a = build_first_logits_sequence(c0, c1, reveal, o0, o1, layout)
    b = build_first_logits_sequence(pert, c1, reveal, o0, o1, layout)
    diff = torch.nonzero(a.idx[0] != b.idx[0]).reshape(-1)
    assert diff.numel() == 3 and torch.equal(a.pos, b.pos)
    assert diff.min() >= 5 * (64 - 3) and diff.max() < 5 * 64          # all inside the moved-last block


def test_input_validation():
    c0, c1 = _codes()
    o = torch.arange(4)
    with pytest.raises(ValueError, match="reveal"):
        build_first_logits_sequence(c0, c1, torch.zeros(3, dtype=torch.bool), o, o, TINY)
    with pytest.raises(ValueError, match="permutation"):
        build_first_logits_sequence(c0, c1, torch.zeros(4, dtype=torch.bool), torch.tensor([0, 0, 1, 2]), o, TINY)
    with pytest.raises(ValueError, match="code range"):
        build_first_logits_sequence(c0 + 16, c1, torch.zeros(4, dtype=torch.bool), o, o, TINY)
    with pytest.raises(ValueError, match="overlap"):
        TokenLayout(n_codes=16, grid=2, ptr0_offset=10, ptr1_offset=20, pos0_offset=0, pos1_offset=20)
    with pytest.raises(ValueError, match="position ranges overlap"):
        TokenLayout(n_codes=16, grid=2, ptr0_offset=16, ptr1_offset=20, pos0_offset=0, pos1_offset=10)
    with pytest.raises(ValueError, match="targets"):
        build_full_sequence(c0, c1, torch.zeros(4, dtype=torch.bool), o, o, TINY, targets="all")
    assert isinstance(build_first_logits_sequence(c0, c1, torch.zeros(4, dtype=torch.bool), o, o, TINY), Seq)
