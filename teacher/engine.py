"""KLEngine: KL maps for many query points of one frame pair, with shared work (a ``KLMapsFn``).

The naive method (``teacher.kltrace.kl_maps_naive``) runs, per query, one clean and one perturbed pass of T
tokens, T = 5P + 5R + M (P frame-0 patches, R revealed and M masked frame-1 patches). The engine computes the
same maps from shared passes:

1. Groups. Queries are split by a k-d tree (median split along the longer side) into spatially compact groups
   of at most ``group_size``; with ``adaptive`` a node is split further whenever that lowers the token count
   below. U_g = frame-0 patches touched by any bump of group g (``teacher.kltrace.touched_cells``).
2. Order. ``last0 = U_g`` is moved to the end of the shuffled frame-0 order (``move_last``), for the clean and
   every perturbed pass of the group, so the first 5(P - |U_g|) tokens are the same in all of them (checked:
   a perturbed code outside U_g raises).
3. Passes. prefix = those tokens, one pass with the KV cache returned (batch 1);
   suffix = [U_g patches (clean, or with that query's bump)][revealed frame-1][masked pointers], run for the
   clean row and every query's perturbed row in batches, attending to the cached prefix (broadcast over the
   batch). lm_head runs only at the masked pointers.
4. Maps. KL(clean || perturbed) of the first-code distributions at each masked cell, over the code range in
   fp32; revealed cells are NaN. With p = softmax of the clean row and z the perturbed row's code logits,
   KL = sum p log p - sum p z + logsumexp(z) sum p, so no log-softmax of the perturbed rows is materialised
   (``fast_kl=False``: ``teacher.kltrace.kl_divergence`` on both log-softmaxes, as the naive method).

Tokens per group = 5(P - U) + (1 + n)(5U + 5R + M) against the naive 2nT; the maps equal
``kl_maps_naive(..., last0=U_g)`` up to float rounding (causal attention over prefix + suffix is one causal
pass). Zoom levels get the same sharing when ``kl_trace`` shares crops (``KLTraceConfig.share_crops``): it
calls the engine once per crop pair with all the queries inside it.

Models without the LRAS interface (``forward`` with a KV cache, ``build``, ``frame_codes``), e.g. the
ideal-predictor fixture, take the generic path: one clean pass per group and batched perturbed passes through
``first_code_logprobs`` (same last0 ordering, no prefix reuse).

``TokenMeter`` counts what the transformer processes (a forward pre-hook: batch x new tokens per call), so the
naive method and the engine are counted the same way (``CountingKLMaps``). ``plan_tokens`` gives the engine's
count for a layout without running the transformer (the planner the engine itself uses).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from teacher.kltrace import gaussian_bump, kl_divergence, kl_map_inputs, touched_cells


# ---------------------------------------------------------------------------------------------- planning

@dataclass
class GroupPlan:
    members: torch.Tensor          # [n] indices into the call's queries
    last0: torch.Tensor            # sorted frame-0 patch ids placed last (touched by some bump of the group)
    prefix_tokens: int             # tokens of the shared prefix pass
    suffix_tokens: int             # tokens of each suffix row (clean + one per member)

    @property
    def tokens(self) -> int:
        return self.prefix_tokens + (1 + len(self.members)) * self.suffix_tokens


def group_tokens(n: int, touched: int, P: int, tpp: int, rest: int) -> int:
    """Engine tokens for one group of n queries whose bumps touch ``touched`` patches; rest = 5R + M."""
    return tpp * (P - touched) + (1 + n) * (tpp * touched + rest)


def _kd_halves(xy: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pts = xy[idx]
    span = pts.max(0).values - pts.min(0).values
    axis = 1 if float(span[1]) > float(span[0]) else 0
    order = idx[torch.argsort(pts[:, axis], stable=True)]
    half = (len(idx) + 1) // 2
    return order[:half], order[half:]


def plan_groups(xy: torch.Tensor, touched: torch.Tensor, P: int, tpp: int, rest: int, group_size: int = 32,
                adaptive: bool = True) -> list[GroupPlan]:
    """Split queries ``xy`` [Q,2] (touched [Q,P] bool) into groups (module docstring, step 1).

    Nodes larger than ``group_size`` are always split; with ``adaptive`` the k-d tree below is searched for the
    cheapest set of leaves (cost = ``group_tokens``)."""
    xy = torch.as_tensor(xy, dtype=torch.float64).reshape(-1, 2)
    Q = xy.shape[0]
    if Q == 0:
        return []
    group_size = max(1, int(group_size))

    def cost(idx):
        u = int(touched[idx].any(0).sum())
        return group_tokens(len(idx), u, P, tpp, rest)

    def best(idx) -> tuple[int, list[torch.Tensor]]:
        if len(idx) > group_size:
            a, b = _kd_halves(xy, idx)
            ca, ga = best(a)
            cb, gb = best(b)
            return ca + cb, ga + gb
        here = cost(idx)
        if adaptive and len(idx) > 1:
            a, b = _kd_halves(xy, idx)
            ca, ga = best(a)
            cb, gb = best(b)
            if ca + cb < here:
                return ca + cb, ga + gb
        return here, [idx]

    _, groups = best(torch.arange(Q))
    plans = []
    for idx in groups:
        last0 = torch.nonzero(touched[idx].any(0)).reshape(-1)
        u = len(last0)
        plans.append(GroupPlan(members=idx, last0=last0, prefix_tokens=tpp * (P - u), suffix_tokens=tpp * u + rest))
    return plans


def touched_masks(xy: torch.Tensor, cfg, image_size: tuple[int, int], cell: int) -> torch.Tensor:
    """[Q, P] bool: frame-0 patches each query's bump changes (``teacher.kltrace.touched_cells``)."""
    H, W = image_size
    P = (H // cell) * (W // cell)
    xy = torch.as_tensor(xy, dtype=torch.float32).reshape(-1, 2)
    out = torch.zeros(xy.shape[0], P, dtype=torch.bool)
    cells = touched_cells(xy, cfg, image_size, cell)
    for q, c in enumerate(cells):
        out[q, torch.as_tensor(c, dtype=torch.long)] = True
    return out


def plan_tokens(xy: torch.Tensor, reveal: torch.Tensor, cfg, image_size: tuple[int, int], cell: int,
                tokens_per_patch: int, group_size: int = 32, adaptive: bool = True) -> dict:
    """What the engine (LRAS path, ``last0="touched"``) and the naive method process for one call, without
    running anything: {"engine_tokens", "naive_tokens", "groups", "queries", "passes"}."""
    reveal = torch.as_tensor(reveal, dtype=torch.bool)
    P = reveal.numel()
    R = int(reveal.sum())
    rest = tokens_per_patch * R + (P - R)
    plans = plan_groups(xy, touched_masks(xy, cfg, image_size, cell), P, tokens_per_patch, rest, group_size,
                        adaptive)
    Q = int(torch.as_tensor(xy).reshape(-1, 2).shape[0])
    T = tokens_per_patch * P + rest
    return {"engine_tokens": sum(p.tokens for p in plans), "naive_tokens": 2 * T * Q, "groups": len(plans),
            "queries": Q, "passes": sum(1 + len(p.members) for p in plans)}


# ---------------------------------------------------------------------------------------------- counting

class TokenMeter:
    """Counts transformer work through forward hooks: ``tokens`` += batch x new tokens of each call, ``rows``
    += batch, ``calls`` += 1, ``seconds`` += wall time inside the forward (lm_head included)."""

    def __init__(self):
        self.tokens = 0
        self.calls = 0
        self.rows = 0
        self.seconds = 0.0
        self._t0 = None

    def _pre(self, module, args, kwargs):
        idx = args[0] if args else kwargs["idx"]
        self.tokens += int(idx.numel())
        self.rows += int(idx.shape[0])
        self.calls += 1
        self._t0 = time.perf_counter()

    def _post(self, module, args, kwargs, output):
        if self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None

    @contextlib.contextmanager
    def attach(self, module: torch.nn.Module):
        pre = module.register_forward_pre_hook(self._pre, with_kwargs=True)
        post = module.register_forward_hook(self._post, with_kwargs=True)
        try:
            yield self
        finally:
            pre.remove()
            post.remove()


class CountingKLMaps:
    """Wrap a ``KLMapsFn`` (``kl_maps_naive`` or a ``KLEngine``): per call, count transformer tokens (a
    ``TokenMeter`` on ``model.lras``), forward calls and their seconds, queries, calls and wall seconds in
    ``.stats``."""

    def __init__(self, fn):
        self.fn = fn
        self.stats = {"tokens": 0, "forward_calls": 0, "forward_seconds": 0.0, "queries": 0, "calls": 0,
                      "seconds": 0.0}

    def __call__(self, model, frame0, frame1, queries, reveal, seed, cfg, **kw):
        meter = TokenMeter()
        lras = getattr(model, "lras", None)
        ctx = meter.attach(lras) if isinstance(lras, torch.nn.Module) else contextlib.nullcontext()
        t0 = time.perf_counter()
        with ctx:
            out = self.fn(model, frame0, frame1, queries, reveal, seed, cfg, **kw)
        self.stats["seconds"] += time.perf_counter() - t0
        self.stats["tokens"] += meter.tokens
        self.stats["forward_calls"] += meter.calls
        self.stats["forward_seconds"] += meter.seconds
        self.stats["queries"] += int(torch.as_tensor(queries).reshape(-1, 2).shape[0])
        self.stats["calls"] += 1
        return out


# ---------------------------------------------------------------------------------------------- engine

def _has_kv_interface(model) -> bool:
    return all(callable(getattr(model, a, None)) for a in ("forward", "build", "frame_codes", "code_logprobs")) \
        and hasattr(model, "layout") and isinstance(getattr(model, "lras", None), torch.nn.Module)


def _new_stats() -> dict:
    return {"calls": 0, "queries": 0, "groups": 0, "tokens": 0, "prefix_tokens": 0, "suffix_tokens": 0,
            "passes": 0, "forward_calls": 0, "naive_tokens": 0, "seconds": 0.0}


class _CleanRow:
    """The clean pass of a group: logp [1, M, K] and what the fast KL needs from it."""

    def __init__(self, logp: torch.Tensor):
        self.logp = logp.float()                                                        # [1, M, K]
        p = self.logp.exp()
        self.p = p
        self.sum_p = p.sum(-1)                                                          # [1, M] (= 1 up to rounding)
        zero = torch.zeros((), dtype=torch.float32, device=p.device)
        self.neg_h = torch.where(p > 0, p * self.logp, zero).sum(-1)                     # [1, M] sum p log p

    def kl_from_logits(self, z: torch.Tensor) -> torch.Tensor:
        """z [b, M, K] code logits of perturbed rows -> KL(p || softmax z) [b, M] without materialising log q:
        sum p (log p - z + lse z) = sum p log p - p.z + lse(z) sum p."""
        z = z.float()
        lse = torch.logsumexp(z, dim=-1)                                                # [b, M]
        dot = (z * self.p).sum(-1)          # [b, M]; a cascaded sum: a BLAS dot over K codes loses ~1e-4 here
        return self.neg_h - dot + lse * self.sum_p


class KLEngine:
    """Batched KL maps (module docstring). Call it like ``kl_maps_naive``::

        engine = KLEngine(tracer, group_size=32, batch=16)
        maps = engine(tracer, frame0, frame1, queries, reveal, seed, cfg)    # [Q, P], NaN at revealed cells

    ``batch``: perturbed rows per forward (also capped so that one batch's logits stay under
    ``logits_budget`` bytes). ``last0``: "touched" (the bumps' geometric support, plannable) or "changed"
    (only patches whose frame-0 codes the bumps actually change; fewer suffix tokens, same exactness).
    ``fast_kl``: KL(p || q) = sum p log p - p.z + lse(z) from the perturbed code logits z (no log q tensor; same
    value up to fp32 rounding); False: ``kl_divergence`` on log-softmaxes, as the naive method.
    ``.stats`` accumulates over calls: tokens (transformer tokens processed), prefix/suffix tokens, passes
    (clean + perturbed sequences), forward_calls, groups, queries, naive_tokens (2T per query), seconds.
    ``.last_plans`` holds the groups of the latest call (members, last0) for inspection and tests.
    """

    def __init__(self, tracer=None, group_size: int = 32, batch: int = 16, adaptive: bool = True,
                 last0: str = "touched", logits_budget: int = 1 << 30, fast_kl: bool = True):
        if last0 not in ("touched", "changed"):
            raise ValueError(f"last0 must be 'touched' or 'changed', got {last0!r}")
        if int(group_size) < 1 or int(batch) < 1:
            raise ValueError("group_size and batch must be >= 1")
        self.tracer = tracer
        self.group_size = int(group_size)
        self.batch = int(batch)
        self.adaptive = bool(adaptive)
        self.last0_policy = last0
        self.logits_budget = int(logits_budget)
        self.fast_kl = bool(fast_kl)
        self.stats = _new_stats()
        self.last_plans: list[GroupPlan] = []

    def reset_stats(self) -> None:
        self.stats = _new_stats()

    def __call__(self, model, frame0, frame1, queries, reveal, seed, cfg, **kw):
        return self.kl_maps(model, frame0, frame1, queries, reveal, seed, cfg, **kw)

    # ------------------------------------------------------------------------------------------ helpers
    def _perturbed(self, frame0: torch.Tensor, xy: torch.Tensor, cfg) -> torch.Tensor:
        """[n, 3, H, W]: frame 0 with each query's bump (the naive method's perturbation)."""
        n = xy.shape[0]
        return gaussian_bump(frame0.unsqueeze(0).expand(n, -1, -1, -1), xy, cfg.sigma, cfg.amplitude, cfg.bump_radius)

    def _rows_per_batch(self, M: int, V: int) -> int:
        per_row = max(1, M * V * 4 * 3)            # logits + two fp32 temporaries of one row
        return max(1, min(self.batch, self.logits_budget // per_row))

    # ------------------------------------------------------------------------------------------ main
    @torch.no_grad()
    def kl_maps(self, model, frame0: torch.Tensor, frame1: torch.Tensor, queries: torch.Tensor,
                reveal: torch.Tensor, seed: int, cfg) -> torch.Tensor:
        model = model if model is not None else self.tracer
        t0 = time.perf_counter()
        reveal, xy, out, masked = kl_map_inputs(reveal, queries)
        P, Q = reveal.numel(), xy.shape[0]
        if Q == 0:
            return out
        frame0 = torch.as_tensor(frame0, dtype=torch.float32)
        frame1 = torch.as_tensor(frame1, dtype=torch.float32)
        R, M = P - len(masked), len(masked)
        kv = _has_kv_interface(model)
        tpp = model.layout.tokens_per_patch if kv else 5
        rest = tpp * R + M
        touched = touched_masks(xy, cfg, tuple(model.image_size), int(model.cell))
        if touched.shape[1] != P:
            raise ValueError(f"reveal has {P} cells but the model's grid has {touched.shape[1]}")
        plans = plan_groups(xy, touched, P, tpp, rest, self.group_size, self.adaptive)
        done = []
        for plan in plans:
            if kv:
                plan = self._group_kv(model, frame0, frame1, xy, reveal, seed, cfg, plan, touched, out)
            else:
                self._group_generic(model, frame0, frame1, xy, reveal, seed, cfg, plan, out)
            done.append(plan)
        self.last_plans = done
        s = self.stats
        s["calls"] += 1
        s["queries"] += Q
        s["groups"] += len(done)
        s["naive_tokens"] += 2 * Q * (tpp * P + rest)
        s["seconds"] += time.perf_counter() - t0
        return out

    def _group_kv(self, model, frame0, frame1, xy, reveal, seed, cfg, plan: GroupPlan, touched, out) -> GroupPlan:
        P = reveal.numel()
        tpp = model.layout.tokens_per_patch
        members = plan.members
        n = len(members)
        codes0 = model.frame_codes(frame0.unsqueeze(0))                              # [1, P, 4]
        codes1 = model.frame_codes(frame1.unsqueeze(0))
        pcodes = model.frame_codes(self._perturbed(frame0, xy[members], cfg), cache=False)   # [n, P, 4]
        changed = (pcodes != codes0).any(-1).any(0).cpu()                            # [P]
        union = touched[members].any(0)
        if bool((changed & ~union).any()):
            bad = torch.nonzero(changed & ~union).reshape(-1)[:8].tolist()
            raise RuntimeError(f"a bump changed frame-0 codes outside its touched cells (patches {bad}); "
                               f"touched_cells does not cover the bump's support")
        if self.last0_policy == "changed":
            last0 = torch.nonzero(changed).reshape(-1)
            u = len(last0)
            R = int(reveal.sum())
            plan = GroupPlan(members=members, last0=last0, prefix_tokens=tpp * (P - u),
                             suffix_tokens=tpp * u + tpp * R + (P - R))
        last0 = plan.last0
        seq_c = model.build(codes0, codes1, reveal, seed, last0)                     # [1, T]
        seq_p = model.build(pcodes, codes1, reveal, seed, last0)                     # [n, T]
        Lp = plan.prefix_tokens
        if seq_c.idx.shape[1] != Lp + plan.suffix_tokens:
            raise RuntimeError(f"sequence length {seq_c.idx.shape[1]} != planned {Lp} + {plan.suffix_tokens}")
        if not torch.equal(seq_p.idx[:, :Lp], seq_c.idx[:, :Lp].expand(n, -1)):
            raise RuntimeError("perturbed and clean sequences differ inside the shared prefix")
        cache = None
        dev = seq_c.idx.device
        if Lp > 0:
            _, cache = model.forward(seq_c.idx[:, :Lp], seq_c.pos[:, :Lp], return_kv=True,
                                     logits_index=torch.zeros(0, dtype=torch.long, device=dev))
            self.stats["forward_calls"] += 1
        rows = torch.cat([seq_c.idx[:, Lp:], seq_p.idx[:, Lp:]], dim=0)             # [1+n, S]
        spos = seq_c.pos[:, Lp:]                                                      # [1, S]
        li = seq_c.logits_index - Lp
        cells = seq_c.masked.to(torch.long).cpu()                                     # [M] patch id per pointer
        step = self._rows_per_batch(len(li), model.lras.config.vocab_size)
        clean = None
        for s in range(0, 1 + n, step):
            logits = model.forward(rows[s:s + step], spos, past_kv=cache, logits_index=li)   # [b, M, V]
            self.stats["forward_calls"] += 1
            first = 0 if s == 0 else s - 1
            if s == 0:
                clean = _CleanRow(model.code_logprobs(logits[:1]))
                logits = logits[1:]
            if logits.shape[0]:
                if self.fast_kl:
                    kl = clean.kl_from_logits(logits[..., : model.n_codes])
                else:
                    kl = kl_divergence(clean.logp, model.code_logprobs(logits))
                q = members[first:first + logits.shape[0]]
                out[q.unsqueeze(1), cells.unsqueeze(0)] = kl.float().cpu()               # [b, M]
            del logits
        st = self.stats
        st["tokens"] += plan.tokens
        st["prefix_tokens"] += plan.prefix_tokens
        st["suffix_tokens"] += (1 + n) * plan.suffix_tokens
        st["passes"] += 1 + n
        return plan

    def _group_generic(self, model, frame0, frame1, xy, reveal, seed, cfg, plan: GroupPlan, out) -> None:
        members, last0 = plan.members, plan.last0
        masked = torch.nonzero(~reveal).reshape(-1)
        clean = model.first_code_logprobs(frame0.unsqueeze(0), frame1.unsqueeze(0), reveal, seed, last0=last0)
        clean = clean[:, masked]                                                     # [1, M, K]
        K = clean.shape[-1]
        step = max(1, min(self.batch, self.logits_budget // max(1, len(masked) * K * 4 * 2)))
        for s in range(0, len(members), step):
            q = members[s:s + step]
            pert = self._perturbed(frame0, xy[q], cfg)
            logq = model.first_code_logprobs(pert, frame1.unsqueeze(0).expand(len(q), -1, -1, -1), reveal, seed,
                                             last0=last0)[:, masked]
            out[q.unsqueeze(1), masked.unsqueeze(0)] = kl_divergence(clean, logq).float().cpu()
        self.stats["passes"] += 1 + len(members)
