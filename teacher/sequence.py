"""Token sequences of the LRAS two-frame model: pointer + code tokens, explicit position ids, random access.

Layout (reference: lras_3d ``sequence_construction.py`` / predictor ``_pack_image_codes_into_sequence``):

* A frame's code grid [grid*cps, grid*cps] is cut into P = grid*grid patches of cps x cps codes (cps = 2:
  an 8x8-px patch of four 4x4-px codes). Patch id p = row*grid + col (raster order). Pixel (x, y) of a
  256x256 frame lies in patch (y//8)*32 + x//8.
* Each patch is 1 + cps*cps tokens (5):  [pointer, c00, c01, c10, c11]   (codes row-major inside the patch)
      pointer value  = ptr_offset(frame) + p           (content codes are raw codebook indices, no offset)
      position id    = pos_offset(frame) + 5*p + slot  (slot 0 = pointer, 1..4 = codes)
  Positions are assigned before shuffling, so both the pointer value and the position id carry the location.
* Order (first-logits-only, the KL-tracing pass):
      [frame 0: all P patches in order0, 5 tokens each]
      [frame 1 revealed patches, in order1 order, 5 tokens each]
      [pointer tokens of all masked frame-1 patches, in order1 order]
  The output at each masked pointer is that patch's first-code (c00) distribution, so one forward gives every
  masked patch's first-code logits. At the released layout (P = 1024, mask ratio 0.9: 102 revealed)
  T = 5120 + 5*102 + 922 = 6552 tokens with 922 logits positions.
* The 4-code variant (``build_full_sequence``) writes the masked patches in full (pointer + 4 codes): the
  training sequence and the sequence that greedy 4-pass decoding builds up.

Shuffles and reveal masks are seeded (``torch.Generator``), so the clean and the perturbed pass of KL-tracing
see the same order and the same revealed set and differ only in changed content. Pure tensors, no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLayout:
    """Vocabulary and position-id layout of a two-frame LRAS model (defaults: the released 7B RGB model)."""
    n_codes: int = 65536            # content codes occupy token values [0, n_codes)
    grid: int = 32                  # patches per side; P = grid * grid patches per frame
    codes_per_side: int = 2         # a patch is cps x cps codes
    ptr0_offset: int = 65536        # frame-0 pointers: [ptr0_offset, ptr0_offset + P)
    ptr1_offset: int = 66560        # frame-1 pointers: [ptr1_offset, ptr1_offset + P)
    pos0_offset: int = 0            # frame-0 position ids: [pos0_offset, pos0_offset + 5P)
    pos1_offset: int = 5120         # frame-1 position ids: [pos1_offset, pos1_offset + 5P)

    def __post_init__(self):
        for name in ("n_codes", "grid", "codes_per_side"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"TokenLayout.{name} must be a positive int, got {v!r}")
        for name in ("ptr0_offset", "ptr1_offset", "pos0_offset", "pos1_offset"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"TokenLayout.{name} must be a non-negative int, got {v!r}")
        P = self.num_patches
        spans = sorted([(0, self.n_codes, "codes"), (self.ptr0_offset, self.ptr0_offset + P, "frame-0 pointers"),
                        (self.ptr1_offset, self.ptr1_offset + P, "frame-1 pointers")])
        for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
            if b0 < a1:
                raise ValueError(f"TokenLayout: {an} [{a0},{a1}) overlap {bn} [{b0},{b1})")
        n = P * self.tokens_per_patch
        lo, hi = sorted([self.pos0_offset, self.pos1_offset])
        if hi < lo + n:
            raise ValueError(f"TokenLayout: frame position ranges overlap ({self.pos0_offset}, {self.pos1_offset}; "
                             f"{n} ids each)")

    @property
    def tokens_per_patch(self) -> int:
        return 1 + self.codes_per_side ** 2

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def vocab_size(self) -> int:
        """Smallest vocabulary holding the codes and both pointer ranges."""
        P = self.num_patches
        return max(self.n_codes, self.ptr0_offset + P, self.ptr1_offset + P)

    @property
    def block_size(self) -> int:
        """Smallest position table holding both frames' position ids."""
        return max(self.pos0_offset, self.pos1_offset) + self.num_patches * self.tokens_per_patch

    @classmethod
    def for_sizes(cls, n_codes: int, grid: int, codes_per_side: int = 2) -> "TokenLayout":
        """The released convention for other sizes: ptr0 = n_codes, ptr1 = n_codes + P, pos0 = 0, pos1 = 5P."""
        P = grid * grid
        return cls(n_codes=n_codes, grid=grid, codes_per_side=codes_per_side, ptr0_offset=n_codes,
                   ptr1_offset=n_codes + P, pos0_offset=0, pos1_offset=P * (1 + codes_per_side ** 2))


RELEASED_RGB = TokenLayout()


def patchify_codes(codes: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Code grid [B, Hc, Wc] (Hc = Wc = grid*cps) -> patch codes [B, P, cps*cps].

    patches[b, r*grid + c, i*cps + j] = codes[b, r*cps + i, c*cps + j]   (row-major inside each patch)."""
    g, c = layout.grid, layout.codes_per_side
    if codes.dim() != 3 or tuple(codes.shape[1:]) != (g * c, g * c):
        raise ValueError(f"codes must be [B, {g * c}, {g * c}] for this layout, got {tuple(codes.shape)}")
    B = codes.shape[0]
    x = codes.reshape(B, g, c, g, c)                                  # [B, r, i, c, j]
    return x.permute(0, 1, 3, 2, 4).reshape(B, g * g, c * c)          # [B, P, cps*cps]


def num_revealed(P: int, mask_ratio: float) -> int:
    """int(P * (1 - mask_ratio)), as the released predictor (P = 1024, ratio 0.9 -> 102)."""
    if not 0.0 <= float(mask_ratio) <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio!r}")
    return int(P * (1.0 - float(mask_ratio)))


def sample_reveal(P: int, mask_ratio: float, seed: int) -> torch.Tensor:
    """BoolTensor [P]: exactly int(P*(1-mask_ratio)) revealed frame-1 patches, drawn uniformly (seeded)."""
    n = num_revealed(P, mask_ratio)
    g = torch.Generator().manual_seed(int(seed))
    out = torch.zeros(P, dtype=torch.bool)
    out[torch.randperm(P, generator=g)[:n]] = True
    return out


def shuffle_orders(P: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order0, order1): seeded random permutations of the P patch ids of frame 0 and frame 1."""
    g = torch.Generator().manual_seed(int(seed) + 0x5EC)          # independent of sample_reveal's stream
    return torch.randperm(P, generator=g), torch.randperm(P, generator=g)


def move_last(order0: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """order0 [P] with the patch ids in ``last`` moved to the end; both parts keep their relative order.

    Used to put the frame-0 patches touched by a bump last, so the untouched prefix is shared (KV cache)."""
    order0 = torch.as_tensor(order0, dtype=torch.long).reshape(-1)
    last = torch.as_tensor(last, dtype=torch.long).reshape(-1)
    if last.numel() == 0:
        return order0.clone()
    if bool(((last < 0) | (last >= order0.numel())).any()):
        raise ValueError(f"move_last: patch ids must be in [0, {order0.numel()}), got {last.tolist()[:8]}")
    is_last = torch.zeros(order0.numel(), dtype=torch.bool)
    is_last[last] = True
    flag = is_last[order0]                                            # [P] in sequence order
    return torch.cat([order0[~flag], order0[flag]])


@dataclass
class Seq:
    """A built sequence. ``idx``/``pos`` [B, T] long; ``frame0_len`` = 5P; ``masked`` [M] patch ids of the masked
    frame-1 patches in sequence order; ``logits_index`` [M] positions of their pointer tokens (the outputs there
    are the first-code distributions). ``targets`` [B, T] next-token targets (-1 = ignored) for the 4-code
    variant, None for the first-logits sequence."""
    idx: torch.Tensor
    pos: torch.Tensor
    frame0_len: int
    masked: torch.Tensor
    logits_index: torch.Tensor
    targets: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return int(self.idx.shape[1])


def _check_inputs(codes0, codes1, reveal, order0, order1, layout):
    P, S = layout.num_patches, layout.codes_per_side ** 2
    for name, c in (("codes0", codes0), ("codes1", codes1)):
        if c.dim() != 3 or tuple(c.shape[1:]) != (P, S):
            raise ValueError(f"{name} must be [B, {P}, {S}], got {tuple(c.shape)}")
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= layout.n_codes):
            raise ValueError(f"{name} holds values outside the code range [0, {layout.n_codes})")
    B = max(codes0.shape[0], codes1.shape[0])
    if codes0.shape[0] not in (1, B) or codes1.shape[0] not in (1, B):
        raise ValueError(f"batch sizes {codes0.shape[0]} and {codes1.shape[0]} do not broadcast")
    reveal = torch.as_tensor(reveal).reshape(-1)
    if reveal.dtype != torch.bool or reveal.numel() != P:
        raise ValueError(f"reveal must be a bool tensor [{P}], got {reveal.dtype} {tuple(reveal.shape)}")
    orders = []
    for name, o in (("order0", order0), ("order1", order1)):
        o = torch.as_tensor(o, dtype=torch.long).reshape(-1)
        if o.numel() != P or not torch.equal(torch.sort(o).values, torch.arange(P)):
            raise ValueError(f"{name} must be a permutation of range({P})")
        orders.append(o)
    return codes0.long().expand(B, -1, -1), codes1.long().expand(B, -1, -1), reveal, orders[0], orders[1], B


def _patch_tokens(codes: torch.Tensor, patches: torch.Tensor, ptr_offset: int, pos_offset: int,
                  layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Full 5-token blocks of ``patches`` (in that order): idx, pos [B, 5*len(patches)]."""
    B, n, tpp = codes.shape[0], patches.numel(), layout.tokens_per_patch
    ptr = (ptr_offset + patches).reshape(1, n, 1).expand(B, n, 1)          # [B, n, 1]
    idx = torch.cat([ptr, codes[:, patches]], dim=2)                        # [B, n, 5]
    pos = pos_offset + tpp * patches.reshape(n, 1) + torch.arange(tpp).reshape(1, tpp)   # [n, 5]
    return idx.reshape(B, n * tpp), pos.reshape(1, n * tpp).expand(B, -1)


def build_first_logits_sequence(codes0: torch.Tensor, codes1: torch.Tensor, reveal: torch.Tensor,
                                order0: torch.Tensor, order1: torch.Tensor, layout: TokenLayout) -> Seq:
    """[frame 0: order0, 5 tokens each][revealed frame-1 patches, order1 order][masked frame-1 pointers].

    codes0, codes1: [B or 1, P, cps*cps] (broadcast); reveal: bool [P]; orders: permutations of range(P).
    T = 5P + 5R + M with R = reveal.sum(), M = P - R; logits_index = 5P + 5R + arange(M)."""
    codes0, codes1, reveal, order0, order1, B = _check_inputs(codes0, codes1, reveal, order0, order1, layout)
    tpp = layout.tokens_per_patch
    f0_idx, f0_pos = _patch_tokens(codes0, order0, layout.ptr0_offset, layout.pos0_offset, layout)
    rev = order1[reveal[order1]]                                            # revealed ids, order1 order
    masked = order1[~reveal[order1]]                                        # masked ids, order1 order
    r_idx, r_pos = _patch_tokens(codes1, rev, layout.ptr1_offset, layout.pos1_offset, layout)
    m_idx = (layout.ptr1_offset + masked).reshape(1, -1).expand(B, -1)      # [B, M]
    m_pos = (layout.pos1_offset + tpp * masked).reshape(1, -1).expand(B, -1)
    idx = torch.cat([f0_idx, r_idx, m_idx], dim=1)
    pos = torch.cat([f0_pos, r_pos, m_pos], dim=1)
    start = f0_idx.shape[1] + r_idx.shape[1]
    return Seq(idx=idx.contiguous(), pos=pos.contiguous(), frame0_len=f0_idx.shape[1], masked=masked,
               logits_index=start + torch.arange(masked.numel()))


def build_full_sequence(codes0: torch.Tensor, codes1: torch.Tensor, reveal: torch.Tensor, order0: torch.Tensor,
                        order1: torch.Tensor, layout: TokenLayout, targets: str = "codes") -> Seq:
    """The 4-code variant: [frame 0][revealed frame-1 patches][masked frame-1 patches, pointer + 4 codes each].

    Positions and pointer values as in ``build_first_logits_sequence``; T = 5P + 5R + 5M = 10P.
    ``logits_index`` [M] = positions of the masked pointers (first-code outputs, same as the first-logits pass);
    position logits_index + s predicts code slot s+1 of that patch (greedy 4-pass decoding appends them).
    Next-token targets [B, T]: targets[t] = idx[t+1] where idx[t+1] is a content code, -1 elsewhere (pointer
    targets are suppressed because the order is random); ``targets="masked"`` keeps only the masked frame-1
    codes, ``"codes"`` every content code after the first token."""
    if targets not in ("codes", "masked"):
        raise ValueError(f"targets must be 'codes' or 'masked', got {targets!r}")
    codes0, codes1, reveal, order0, order1, B = _check_inputs(codes0, codes1, reveal, order0, order1, layout)
    tpp = layout.tokens_per_patch
    f0_idx, f0_pos = _patch_tokens(codes0, order0, layout.ptr0_offset, layout.pos0_offset, layout)
    rev = order1[reveal[order1]]
    masked = order1[~reveal[order1]]
    r_idx, r_pos = _patch_tokens(codes1, rev, layout.ptr1_offset, layout.pos1_offset, layout)
    m_idx, m_pos = _patch_tokens(codes1, masked, layout.ptr1_offset, layout.pos1_offset, layout)
    idx = torch.cat([f0_idx, r_idx, m_idx], dim=1)
    pos = torch.cat([f0_pos, r_pos, m_pos], dim=1)
    start = f0_idx.shape[1] + r_idx.shape[1]
    tgt = torch.full_like(idx, -1)
    is_code = idx[:, 1:] < layout.n_codes                                   # [B, T-1]
    if targets == "masked":
        is_code[:, :start] = False                                          # positions before the masked block
    tgt[:, :-1] = torch.where(is_code, idx[:, 1:], torch.full_like(idx[:, 1:], -1))
    return Seq(idx=idx.contiguous(), pos=pos.contiguous(), frame0_len=f0_idx.shape[1], masked=masked,
               logits_index=start + tpp * torch.arange(masked.numel()), targets=tgt)
