"""LRAS: the Local Random Access Sequence GPT (a decoder-only transformer over pointer + code tokens).

Architecture (matches the released checkpoints, so their state dicts load with ``strict=True``):
  x = token_embedding[idx] + positional_embedding[pos]          position ids are explicit, not 0..T-1
  per block (pre-LN):  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
      LayerNorm eps 1e-5, weight only (``bias=False``); no linear biases
      attn: fused c_attn d -> 3d split [q|k|v], heads = contiguous d/n_head slices, scale 1/sqrt(head_dim),
            plain causal attention (SDPA), output projection c_proj
      mlp:  c_fc d -> 4d, exact (erf) GELU, c_proj 4d -> d
  logits = lm_head(ln_f(x))                                     lm_head untied from the token embedding

A key/value prefix (``past_kv``) lets a shared prefix be computed once: the new tokens attend to every cached
token and causally among themselves, which is exactly what one causal pass over prefix + new computes.
No I/O here; checkpoints are read by ``teacher.checkpoints``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# one (k, v) pair per layer, each [Bp, n_head, Tp, head_dim]; Bp may be 1 and is then broadcast to the batch
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LRASConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    vocab_size: int = 384
    block_size: int = 640          # size of the position table (max position id + 1), not a sequence limit
    dropout: float = 0.0
    bias: bool = False             # False: no linear biases and weight-only LayerNorm (the released models)

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"LRASConfig.{name} must be a positive int, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"LRASConfig: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LRASConfig.dropout must be in [0, 1), got {self.dropout!r}")


PRESETS: dict[str, LRASConfig] = {
    # the released 7B RGB model used for KL-tracing: V = 65536 codes + 2 x 1024 pointers, positions 2 x 5120
    "7b_rgb": LRASConfig(n_layer=32, n_head=32, n_embd=4096, vocab_size=67584, block_size=10240),
    # 7B RGB + flow tokens
    "7b_rgb_flow": LRASConfig(n_layer=32, n_head=32, n_embd=4096, vocab_size=69120, block_size=19456),
    # 1B RGB + camera pose + quantised flow
    "1b_campose_flow": LRASConfig(n_layer=36, n_head=20, n_embd=1280, vocab_size=111616, block_size=22536),
    # our small teacher: 64x64 frames, 8-bit LPQ codes (256) + 2 x 64 pointers = 384, positions 2 x 64 x 5 = 640
    "tiny": LRASConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=384, block_size=640),
    # the same token layout, a smaller network for tests
    "nano": LRASConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=384, block_size=640),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: LRASConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None):
        B, T, C = x.shape
        hd = C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)                      # 3 x [B, T, C]
        q = q.view(B, T, self.n_head, hd).transpose(1, 2)             # [B, nh, T, hd]
        k = k.view(B, T, self.n_head, hd).transpose(1, 2)
        v = v.view(B, T, self.n_head, hd).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        if past is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            pk, pv = past                                             # [Bp, nh, Tp, hd]
            if pk.size(0) != B:                                       # batch-1 prefix: one copy per layer,
                if pk.size(0) != 1:                                   # freed after the layer unless return_kv
                    raise ValueError(f"past_kv batch {pk.size(0)} does not match batch {B} (must be 1 or {B})")
                pk, pv = pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1)
            Tp = pk.size(2)
            k = torch.cat([pk.to(k.dtype), k], dim=2)                 # [B, nh, Tp+T, hd]
            v = torch.cat([pv.to(v.dtype), v], dim=2)
            # new token i (absolute position Tp+i) sees every key j <= Tp + i
            mask = torch.ones(T, Tp + T, dtype=torch.bool, device=x.device).tril(diagonal=Tp)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)              # [B, T, C]
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, config: LRASConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()                                         # exact erf form
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: LRASConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, past=None):
        a, kv = self.attn(self.ln_1(x), past)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, kv


class LRAS(nn.Module):
    def __init__(self, config: LRASConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            token_embedding=nn.Embedding(config.vocab_size, config.n_embd),
            positional_embedding=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)   # untied
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """GPT-2 initialisation, in place (also usable after ``to_empty``): N(0, std) for linear and embedding
        weights, std/sqrt(2 n_layer) for residual projections, zero biases, LayerNorm weights 1."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln_" in name or name.startswith("transformer.ln_f"):
                p.fill_(1.0)
            elif name.endswith("c_proj.weight"):
                p.normal_(0.0, std / math.sqrt(2 * self.config.n_layer))
            else:
                p.normal_(0.0, std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, pos: torch.Tensor, past_kv: KVCache | None = None,
                return_kv: bool = False, logits_index: torch.Tensor | None = None):
        """idx, pos: LongTensor [B, T] (pos may be [T] or [1, T], broadcast over the batch).

        Returns logits [B, T', V] with T' = T, or T' = len(logits_index) when given (lm_head applied only at
        those positions among the NEW tokens); with ``return_kv`` also the cache over prefix + new tokens
        (a batch-1 prefix comes back expanded to B).
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must be [B, T], got shape {tuple(idx.shape)}")
        B, T = idx.shape
        if pos.dim() == 1:
            pos = pos.unsqueeze(0)
        if pos.dim() != 2 or pos.size(1) != T or pos.size(0) not in (1, B):
            raise ValueError(f"pos shape {tuple(pos.shape)} does not match idx shape {tuple(idx.shape)}")
        if past_kv is not None and len(past_kv) != self.config.n_layer:
            raise ValueError(f"past_kv has {len(past_kv)} layers, model has {self.config.n_layer}")
        if idx.device.type != "meta" and T > 0:                      # one host sync for all four range checks
            bad = ((pos.min() < 0) | (pos.max() >= self.config.block_size)
                   | (idx.min() < 0) | (idx.max() >= self.config.vocab_size))
            if bool(bad):
                raise ValueError(f"ids out of range: tokens [{int(idx.min())}, {int(idx.max())}] must lie in "
                                 f"[0, {self.config.vocab_size}), positions [{int(pos.min())}, {int(pos.max())}] "
                                 f"in [0, {self.config.block_size})")

        tok = self.transformer.token_embedding(idx)                   # [B, T, C]
        pe = self.transformer.positional_embedding(pos)               # [B or 1, T, C]
        x = self.transformer.drop(tok + pe)
        new_kv: KVCache = []
        for i, block in enumerate(self.transformer.h):
            x, kv = block(x, None if past_kv is None else past_kv[i])
            if return_kv:
                new_kv.append(kv)
        if logits_index is not None:
            x = x[:, logits_index]                                    # [B, T', C]
        logits = self.lm_head(self.transformer.ln_f(x))               # [B, T', V]
        return (logits, new_kv) if return_kv else logits
