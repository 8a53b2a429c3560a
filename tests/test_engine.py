"""LRASTracer (TracerModel over LRAS + LPQ) and KLEngine (shared, KV-prefix-reusing KL maps): the engine's maps
equal the naive two-passes-per-query maps with the same ordering, its token accounting is exact, and a randomly
initialised tiny teacher traces with finite, documented outputs."""
import numpy as np
import pytest
import torch

from teacher.checkpoints import load_teacher_bundle, save_teacher_bundle
from teacher.engine import (CountingKLMaps, KLEngine, TokenMeter, group_tokens, plan_groups, plan_tokens,
                            touched_masks)
from teacher.kltrace import KLTraceConfig, kl_maps_naive, kl_trace, touched_cells
from teacher.lpq import LPQ, PRESETS as LPQ_PRESETS
from teacher.lras import LRAS, PRESETS, LRASConfig
from teacher.sequence import RELEASED_RGB, TokenLayout, build_first_logits_sequence, sample_reveal
from teacher.tracer import LRASTracer, unpatchify_codes

torch.set_num_threads(1)

LAYOUT = TokenLayout.for_sizes(256, 8)          # 64x64 frames, 8x8 grid of 8-px patches, 8-bit codes


def _tracer(seed=0, std=0.3, n_layer=2, n_embd=32, preset=None):
    torch.manual_seed(seed)
    cfg = PRESETS[preset] if preset else LRASConfig(n_layer=n_layer, n_head=2, n_embd=n_embd,
                                                    vocab_size=LAYOUT.vocab_size, block_size=LAYOUT.block_size)
    lras = LRAS(cfg).eval()
    lras.init_weights(std=std)                 # larger than GPT-2 init so the random model's KL maps are not ~0
    lpq = LPQ(LPQ_PRESETS["tiny"]).eval()
    return LRASTracer(lras, lpq, LAYOUT, (64, 64))


def _frames(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, 64, 64, generator=g) * 255, torch.rand(3, 64, 64, generator=g) * 255


def _queries(seed=2, n=12):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(n, 2, generator=g) * 64
    extra = torch.tensor([[0.3, 0.2], [63.7, 31.0], [32.0, 32.0]])      # corners / borders / a cell corner
    return torch.cat([q, extra])


# ---------------------------------------------------------------------------------------------- engine == naive

@pytest.mark.parametrize("last0,fast_kl", [("touched", True), ("touched", False), ("changed", True)])
def test_engine_maps_equal_naive_with_same_order(last0, fast_kl):
    tr = _tracer()
    f0, f1 = _frames()
    q = _queries()
    cfg = KLTraceConfig(batch=5)
    reveal = sample_reveal(64, 0.9, 7)
    eng = KLEngine(tr, group_size=4, batch=3, last0=last0, fast_kl=fast_kl)
    got = eng(tr, f0, f1, q, reveal, 7, cfg)
    assert got.shape == (len(q), 64)
    assert len(eng.last_plans) >= 4                                        # several groups
    assert sorted(torch.cat([p.members for p in eng.last_plans]).tolist()) == list(range(len(q)))
    biggest = 0.0
    for plan in eng.last_plans:
        want = kl_maps_naive(tr, f0, f1, q[plan.members], reveal, 7, cfg, last0=plan.last0)
        sub = got[plan.members]
        assert torch.equal(torch.isnan(want), torch.isnan(sub))
        assert torch.equal(torch.isnan(sub[0]), reveal)                     # NaN exactly at revealed cells
        diff = (want - sub).abs()
        assert float(torch.nan_to_num(diff).max()) <= 1e-4
        biggest = max(biggest, float(torch.nan_to_num(want).max()))
        if last0 == "changed":                                               # subset of the geometric support
            union = torch.unique(torch.cat(touched_cells(q[plan.members], cfg, (64, 64), 8)))
            assert set(plan.last0.tolist()) <= set(union.tolist())
    assert biggest > 1e-3                                                    # the comparison is not 0 == 0


def test_engine_fast_kl_is_exact_with_a_65536_code_vocabulary():
    """The fast KL reduces over K = 65536 codes, as at the released layout; fp32 rounding must stay << 1e-4."""
    from teacher.lpq import LPQConfig

    layout = TokenLayout.for_sizes(65536, 4)                     # 32x32 frames, 16 patches, 16-bit codes
    torch.manual_seed(3)
    lras = LRAS(LRASConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=layout.vocab_size,
                           block_size=layout.block_size)).eval()
    lras.init_weights(std=0.3)
    lpq = LPQ(LPQConfig(embed_dim=16, enc_hidden=32, codebook_bits=16, dec_channels=(16, 8, 4), n_res=1,
                        dropout=0.0)).eval()
    tr = LRASTracer(lras, lpq, layout, (32, 32))
    g = torch.Generator().manual_seed(4)
    f0, f1 = torch.rand(3, 32, 32, generator=g) * 255, torch.rand(3, 32, 32, generator=g) * 255
    q = torch.tensor([[5.0, 6.0], [20.0, 9.5], [27.0, 27.0]])
    reveal = sample_reveal(16, 0.75, 1)
    cfg = KLTraceConfig(batch=3)
    eng = KLEngine(tr, group_size=2, batch=2)
    got = eng(tr, f0, f1, q, reveal, 1, cfg)
    for plan in eng.last_plans:
        want = kl_maps_naive(tr, f0, f1, q[plan.members], reveal, 1, cfg, last0=plan.last0)
        assert float(torch.nan_to_num((want - got[plan.members]).abs()).max()) <= 2e-5
    assert float(torch.nan_to_num(got).max()) > 1e-2


def test_engine_token_accounting_is_exact_and_counted_like_naive():
    tr = _tracer(1)
    f0, f1 = _frames(3)
    q = _queries(4, n=9)
    cfg = KLTraceConfig(batch=4)
    reveal = sample_reveal(64, 0.9, 1)
    R, M = int(reveal.sum()), 64 - int(reveal.sum())
    T = 5 * 64 + 5 * R + M
    eng = KLEngine(tr, group_size=4, batch=2)
    meter = TokenMeter()
    with meter.attach(tr.lras):
        eng(tr, f0, f1, q, reveal, 1, cfg)
    planned = sum(p.tokens for p in eng.last_plans)
    assert meter.tokens == eng.stats["tokens"] == planned
    for p in eng.last_plans:
        u = len(p.last0)
        assert p.tokens == 5 * (64 - u) + (1 + len(p.members)) * (5 * u + 5 * R + M)
    assert eng.stats["naive_tokens"] == 2 * T * len(q)
    assert eng.stats["passes"] == sum(1 + len(p.members) for p in eng.last_plans)
    plan = plan_tokens(q, reveal, cfg, (64, 64), 8, 5, group_size=4)
    assert plan["engine_tokens"] == planned and plan["naive_tokens"] == 2 * T * len(q)
    naive = CountingKLMaps(kl_maps_naive)
    naive(tr, f0, f1, q, reveal, 1, cfg)
    assert naive.stats["tokens"] == 2 * T * len(q) and naive.stats["queries"] == len(q)
    counted = CountingKLMaps(KLEngine(tr, group_size=4, batch=2))
    counted(tr, f0, f1, q, reveal, 1, cfg)
    assert counted.stats["tokens"] == planned


def test_grouping_at_released_layout_meets_the_token_ratio():
    """Planning only (no model): 256 queries on a 16-px grid of a 256x256 frame, one mask at mask ratio 0.9."""
    cfg = KLTraceConfig()
    reveal = sample_reveal(1024, 0.9, 1110)
    ys, xs = torch.meshgrid(torch.arange(16) * 16 + 8.0, torch.arange(16) * 16 + 8.0, indexing="ij")
    q = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)
    fixed = plan_tokens(q, reveal, cfg, (256, 256), 8, 5, group_size=32, adaptive=False)
    adaptive = plan_tokens(q, reveal, cfg, (256, 256), 8, 5, group_size=32, adaptive=True)
    assert fixed["groups"] == 8
    assert fixed["naive_tokens"] / fixed["engine_tokens"] >= 5.0
    assert adaptive["engine_tokens"] <= fixed["engine_tokens"]
    T = 5120 + 5 * 102 + 922
    assert T == 6552 and fixed["naive_tokens"] == 2 * T * 256
    touched = touched_masks(q, cfg, (256, 256), 8)
    plans = plan_groups(q, touched, 1024, 5, 5 * 102 + 922, 32, adaptive=False)
    assert all(len(p.members) == 32 for p in plans)
    assert sum(p.tokens for p in plans) == fixed["engine_tokens"]
    assert group_tokens(32, 128, 1024, 5, 1432) == plans[0].tokens


def test_engine_refuses_a_prefix_that_the_bump_changes(monkeypatch):
    import teacher.engine as engine_mod

    tr = _tracer()
    f0, f1 = _frames()
    monkeypatch.setattr(engine_mod, "touched_cells", lambda xy, cfg, hw, cell: [torch.zeros(0, dtype=torch.long)
                                                                                for _ in range(len(xy))])
    with pytest.raises(RuntimeError, match="outside its touched cells"):
        KLEngine(tr)(tr, f0, f1, torch.tensor([[20.0, 20.0]]), sample_reveal(64, 0.9, 0), 0, KLTraceConfig())


class _NoKV:
    """A TracerModel without the LRAS interface (only the protocol), to exercise the generic path."""

    def __init__(self, tracer):
        self._t = tracer
        self.image_size, self.cell = tracer.image_size, tracer.cell

    def first_code_logprobs(self, *a, **k):
        return self._t.first_code_logprobs(*a, **k)


def test_engine_generic_path_equals_naive():
    tr = _tracer(2)
    model = _NoKV(tr)
    f0, f1 = _frames(5)
    q = _queries(6, n=5)
    cfg = KLTraceConfig(batch=3)
    reveal = sample_reveal(64, 0.9, 2)
    eng = KLEngine(None, group_size=3, batch=2)
    got = eng(model, f0, f1, q, reveal, 2, cfg)
    for plan in eng.last_plans:
        want = kl_maps_naive(model, f0, f1, q[plan.members], reveal, 2, cfg, last0=plan.last0)
        assert float(torch.nan_to_num((want - got[plan.members]).abs()).max()) <= 1e-5
    assert eng.stats["tokens"] == 0 and eng.stats["passes"] == sum(1 + len(p.members) for p in eng.last_plans)


# ---------------------------------------------------------------------------------------------- tracer

def test_tracer_first_code_logprobs_shapes_order_and_cache():
    tr = _tracer(3)
    f0, f1 = _frames(7)
    reveal = sample_reveal(64, 0.9, 3)
    calls = []
    orig = tr.lpq.quantize
    tr.lpq.quantize = lambda x: calls.append(x.shape[0]) or orig(x)
    lp = tr.first_code_logprobs(f0[None].expand(2, -1, -1, -1), f1[None], reveal, 3)
    assert lp.shape == (2, 64, 256) and lp.dtype == torch.float32
    m = ~reveal
    assert torch.isfinite(lp[:, m]).all()
    assert torch.allclose(lp[:, m].exp().sum(-1), torch.ones(2, int(m.sum())), atol=1e-5)
    assert torch.allclose(lp[0], lp[1])                                       # same inputs, same rows
    assert sum(calls) == 2                                                    # f0 once (2 equal rows) + f1 once
    lp2 = tr.first_code_logprobs(f0[None], f1[None], reveal, 3)
    assert sum(calls) == 2                                                    # both frames came from the cache
    assert torch.allclose(lp2[0], lp[0], atol=1e-6)
    moved = tr.first_code_logprobs(f0[None], f1[None], reveal, 3, last0=torch.tensor([0, 9, 10]))
    assert torch.isfinite(moved[:, m]).all() and not torch.allclose(moved, lp2)   # the order changed
    other = tr.first_code_logprobs(f0[None], f1[None], reveal, 4)
    assert not torch.allclose(other[:, m & ~sample_reveal(64, 0.9, 4)], lp2[:, m & ~sample_reveal(64, 0.9, 4)])
    with pytest.raises(ValueError, match="frame0"):
        tr.first_code_logprobs(torch.zeros(1, 3, 32, 32), f1[None], reveal, 0)
    with pytest.raises(ValueError, match="reveal"):
        tr.first_code_logprobs(f0[None], f1[None], torch.ones(64, dtype=torch.bool), 0)


def test_tracer_matches_an_explicit_sequence_forward():
    tr = _tracer(4)
    f0, f1 = _frames(9)
    reveal = sample_reveal(64, 0.9, 5)
    last0 = torch.tensor([3, 4, 11])
    got = tr.first_code_logprobs(f0[None], f1[None], reveal, 5, last0=last0)
    c0, c1 = tr.quantize(f0[None]), tr.quantize(f1[None])
    o0, o1 = tr.orders(5, last0)
    assert o0[-3:].sort().values.tolist() == [3, 4, 11]
    seq = build_first_logits_sequence(c0, c1, reveal, o0, o1, LAYOUT)
    with torch.no_grad():
        logits = tr.lras(seq.idx, seq.pos)                                   # every position, plain causal
    want = torch.log_softmax(logits[0, seq.logits_index, :256], -1)
    assert torch.allclose(got[0, seq.masked], want, atol=1e-5)


def test_predict_frame1_greedy_passes_equal_one_causal_pass():
    tr = _tracer(5)
    f0, f1 = _frames(11)
    reveal = sample_reveal(64, 0.9, 6)
    codes = tr.predict_codes(f0[None], f1[None], reveal, 6)                   # [1, 64, 4]
    c0, c1 = tr.quantize(f0[None]), tr.quantize(f1[None])
    assert torch.equal(codes[0, reveal], c1[0, reveal])                       # revealed patches keep their codes
    assert int(codes.min()) >= 0 and int(codes.max()) < 256
    # recompute greedily with full sequences: [ctx][pointers][c00s][c01s][c10s], argmax at the newest block
    o0, o1 = tr.orders(6)
    seq = build_first_logits_sequence(c0, c1, reveal, o0, o1, LAYOUT)
    idx, pos = seq.idx, seq.pos
    read = seq.logits_index
    masked = seq.masked
    for s in range(4):
        with torch.no_grad():
            logits = tr.lras(idx, pos)[0, read, :256]
        code = logits.argmax(-1)
        assert torch.equal(code, codes[0, masked, s])
        read = idx.shape[1] + torch.arange(len(masked))
        idx = torch.cat([idx, code[None]], 1)
        pos = torch.cat([pos, (LAYOUT.pos1_offset + 5 * masked + 1 + s)[None]], 1)
    img = tr.predict_frame1(f0[None], f1[None], reveal, 6)
    assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()
    assert float(img.min()) >= 0 and float(img.max()) <= 255
    grid = unpatchify_codes(c1, LAYOUT)
    assert torch.equal(grid, tr.lpq.quantize(__import__("teacher.lpq", fromlist=["normalize"]).normalize(f1[None])))


def test_bf16_autocast_flag_runs_and_stays_close():
    tr = _tracer(6, std=0.05)
    f0, f1 = _frames(13)
    reveal = sample_reveal(64, 0.9, 8)
    ref = tr.first_code_logprobs(f0[None], f1[None], reveal, 8)
    tr.autocast_bf16 = True
    lp = tr.first_code_logprobs(f0[None], f1[None], reveal, 8)
    m = ~reveal
    assert lp.dtype == torch.float32 and torch.isfinite(lp[:, m]).all()
    assert float((lp[:, m] - ref[:, m]).abs().max()) < 0.5


def test_from_bundle_roundtrip(tmp_path):
    tr = _tracer(7, preset="nano")
    tid = save_teacher_bundle(tmp_path / "t", tr.lras, tr.lpq, LAYOUT, (64, 64), provenance={"test": True})
    b = load_teacher_bundle(tmp_path / "t")
    assert b.teacher_id == tid
    tr2 = LRASTracer.from_bundle(b)
    assert tr2.image_size == (64, 64) and tr2.cell == 8 and tr2.layout == LAYOUT
    f0, f1 = _frames(15)
    reveal = sample_reveal(64, 0.9, 9)
    assert torch.allclose(tr2.first_code_logprobs(f0[None], f1[None], reveal, 9),
                          tr.first_code_logprobs(f0[None], f1[None], reveal, 9), atol=1e-6)
    with pytest.raises(ValueError, match="image_size"):
        LRASTracer(tr.lras, tr.lpq, LAYOUT, (128, 128))
    with pytest.raises(ValueError, match="n_codes"):
        LRASTracer(tr.lras, tr.lpq, RELEASED_RGB, (256, 256))


# ---------------------------------------------------------------------------------------------- kl_trace

def test_kl_trace_with_engine_on_random_tiny_teacher_is_finite_and_shaped():
    tr = _tracer(8, std=0.02, preset="tiny")                 # the tiny preset, randomly initialised
    rng = np.random.default_rng(0)
    frame0 = rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)             # any size: kl_trace resizes / crops
    frame1 = np.roll(frame0, 3, axis=1)
    q = torch.tensor([[10.0, 12.0], [30.5, 20.0], [90.0, 70.0], [47.0, 40.0]])
    cfg = KLTraceConfig(num_masks=2, zoom_levels=2)
    eng = KLEngine(tr, group_size=32, batch=8)
    res = kl_trace(tr, frame0, frame1, q, cfg, kl_maps_fn=eng, return_maps=True)
    assert res.targets.shape == (4, 2) and res.targets.dtype == torch.float32
    assert torch.isfinite(res.targets).all() and torch.isfinite(res.score).all()
    assert res.visible.shape == (4,) and res.visible.dtype == torch.bool
    assert res.levels.shape == (3, 4, 2) and len(res.maps) == 3
    assert res.maps[0]["kl"].shape == (4, 8, 8)
    assert eng.stats["calls"] == res.stats["kl_maps_calls"] and eng.stats["tokens"] > 0
    assert eng.stats["tokens"] < eng.stats["naive_tokens"]
