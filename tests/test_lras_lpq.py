"""LRAS transformer and LPQ tokenizer: released parameter names/shapes load strictly, the forward pass is the
architecture described in the reference, the KV prefix is exact, and the tokenizer is strictly local with the
LFQ bit order (first dimension = most significant bit)."""
import math

import pytest
import torch
import torch.nn.functional as F

from teacher.checkpoints import check_state_dict
from teacher.lpq import LPQ, PRESETS as LPQ_PRESETS, LPQConfig, bits_to_codes, codes_to_bits, denormalize, normalize
from teacher.lras import LRAS, PRESETS, LRASConfig

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------ reference names

def reference_lras_shapes(n_layer, n_embd, vocab_size, block_size):
    """State-dict names and shapes of a released LRAS checkpoint, written from the reference's key list (§2)."""
    d = n_embd
    shapes = {
        "transformer.token_embedding.weight": (vocab_size, d),
        "transformer.positional_embedding.weight": (block_size, d),
        "transformer.ln_f.weight": (d,),
        "lm_head.weight": (vocab_size, d),
    }
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        shapes.update({p + "ln_1.weight": (d,), p + "attn.c_attn.weight": (3 * d, d),
                       p + "attn.c_proj.weight": (d, d), p + "ln_2.weight": (d,),
                       p + "mlp.c_fc.weight": (4 * d, d), p + "mlp.c_proj.weight": (d, 4 * d)})
    return shapes


def reference_lpq_shapes():
    """State-dict names and shapes of the released RGB LPQ (reference §1.4 and §2)."""
    shapes = {"encoder.0.weight": (512, 3, 4, 4), "encoder.0.bias": (512,),
              "encoder.2.ln1.weight": (512,), "encoder.2.ln1.bias": (512,),
              "encoder.2.conv1.weight": (1024, 512, 1, 1), "encoder.2.conv1.bias": (1024,),
              "encoder.2.conv2.weight": (512, 1024, 1, 1), "encoder.2.conv2.bias": (512,),
              "quantizer.project_in.weight": (16, 512), "quantizer.project_in.bias": (16,),
              "quantizer.project_out.weight": (512, 16), "quantizer.project_out.bias": (512,),
              "quantizer.mask": (16,),
              "decoder.3.conv.weight": (256, 512, 3, 3), "decoder.3.conv.bias": (256,),
              "decoder.7.conv.weight": (128, 256, 3, 3), "decoder.7.conv.bias": (128,),
              "decoder.11.weight": (3, 128, 3, 3), "decoder.11.bias": (3,)}
    for idxs, c in (((0, 1, 2), 512), ((4, 5, 6), 256), ((8, 9, 10), 128)):
        for i in idxs:
            shapes.update({f"decoder.{i}.ln1.weight": (c,), f"decoder.{i}.ln1.bias": (c,),
                           f"decoder.{i}.conv1.weight": (2 * c, c, 3, 3), f"decoder.{i}.conv1.bias": (2 * c,),
                           f"decoder.{i}.conv2.weight": (c, 2 * c, 3, 3), f"decoder.{i}.conv2.bias": (c,)})
    return shapes


def meta_sd(shapes, dtype=torch.bfloat16):
    return {k: torch.empty(s, device="meta", dtype=torch.int64 if k.endswith("mask") else dtype)
            for k, s in shapes.items()}


# ------------------------------------------------------------------------------------------ LRAS: loading

@pytest.mark.parametrize("name,params", [("7b_rgb", 7_038_308_352), ("1b_campose_flow", 1_022_465_280)])
def test_released_presets_load_reference_state_dict_on_meta(name, params):
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = LRAS(cfg)
    assert model.num_params() == params
    sd = meta_sd(reference_lras_shapes(cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.block_size))
    check_state_dict(model, sd)
    model.load_state_dict(sd, strict=True, assign=True)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.lm_head.weight is not model.transformer.token_embedding.weight
    assert model.transformer.h[7].attn.c_attn.weight.shape == (3 * cfg.n_embd, cfg.n_embd)
    assert all(b is None for b in (model.transformer.h[0].attn.c_attn.bias, model.transformer.h[0].ln_1.bias))


def test_other_released_preset_counts():
    with torch.device("meta"):
        assert LRAS(PRESETS["7b_rgb_flow"]).num_params() == 7_088_640_000


def test_wrong_shape_missing_and_unexpected_keys_are_named():
    cfg = PRESETS["7b_rgb"]
    with torch.device("meta"):
        model = LRAS(cfg)
    shapes = reference_lras_shapes(cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.block_size)
    bad = dict(shapes)
    bad["transformer.h.3.mlp.c_fc.weight"] = (4 * cfg.n_embd, cfg.n_embd + 1)
    with pytest.raises(ValueError, match=r"transformer\.h\.3\.mlp\.c_fc\.weight.*\(16384, 4097\)"):
        check_state_dict(model, meta_sd(bad))
    bad = dict(shapes)
    del bad["transformer.ln_f.weight"]
    bad["transformer.ln_f.bias"] = (cfg.n_embd,)
    with pytest.raises(ValueError, match=r"missing key.*transformer\.ln_f\.weight.*unexpected key.*ln_f\.bias"):
        check_state_dict(model, meta_sd(bad))
    # torch's own strict loading agrees that the good dict is exactly right
    model.load_state_dict(meta_sd(shapes), strict=True, assign=True)


def _random_reference_sd(cfg, gen):
    """Real tensors with the reference names/shapes; LayerNorm weights away from 1 so the test sees them."""
    sd = {}
    for k, s in reference_lras_shapes(cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.block_size).items():
        if ".ln_" in k or "ln_f" in k:
            sd[k] = 1.0 + 0.3 * torch.randn(s, generator=gen)
        else:
            sd[k] = 0.15 * torch.randn(s, generator=gen)
    return sd


def naive_lras_logits(sd, cfg, idx, pos):
    """Independent plain-tensor forward of the reference architecture (heads as contiguous slices, exact GELU)."""
    d, nh = cfg.n_embd, cfg.n_head
    hd = d // nh
    x = sd["transformer.token_embedding.weight"][idx] + sd["transformer.positional_embedding.weight"][pos]
    T = idx.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        h = F.layer_norm(x, (d,), sd[p + "ln_1.weight"], None, 1e-5)
        qkv = h @ sd[p + "attn.c_attn.weight"].T
        q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
        heads = []
        for j in range(nh):
            s = slice(j * hd, (j + 1) * hd)
            att = (q[..., s] @ k[..., s].transpose(-1, -2)) / math.sqrt(hd)
            att = att.masked_fill(~causal, float("-inf")).softmax(-1)
            heads.append(att @ v[..., s])
        x = x + torch.cat(heads, -1) @ sd[p + "attn.c_proj.weight"].T
        h = F.layer_norm(x, (d,), sd[p + "ln_2.weight"], None, 1e-5)
        a = h @ sd[p + "mlp.c_fc.weight"].T
        a = 0.5 * a * (1.0 + torch.erf(a / math.sqrt(2.0)))
        x = x + a @ sd[p + "mlp.c_proj.weight"].T
    x = F.layer_norm(x, (d,), sd["transformer.ln_f.weight"], None, 1e-5)
    return x @ sd["lm_head.weight"].T


@pytest.mark.parametrize("name", ["nano", "tiny"])
def test_tiny_presets_load_reference_weights_and_match_naive_forward(name):
    cfg = PRESETS[name]
    gen = torch.Generator().manual_seed(0)
    sd = _random_reference_sd(cfg, gen)
    model = LRAS(cfg).eval()
    model.load_state_dict(sd, strict=True)
    B, T = 2, 23
    idx = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    pos = torch.randint(0, cfg.block_size, (B, T), generator=gen)   # explicit ids, not 0..T-1
    with torch.no_grad():
        got = model(idx, pos)
    assert got.shape == (B, T, cfg.vocab_size)
    want = naive_lras_logits(sd, cfg, idx, pos)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    # the position ids matter, the order of tokens alone does not define them
    with torch.no_grad():
        other = model(idx, torch.roll(pos, 1, dims=1))
    assert (other - got).abs().max() > 1e-2


def _nano(seed=0):
    cfg = PRESETS["nano"]
    model = LRAS(cfg).eval()
    model.load_state_dict(_random_reference_sd(cfg, torch.Generator().manual_seed(seed)))
    return model, cfg


def test_config_validation_and_range_checks():
    with pytest.raises(ValueError, match="divisible"):
        LRASConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="n_layer"):
        LRASConfig(n_layer=0)
    model, cfg = _nano()
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="positions"):
        model(idx, torch.tensor([[0, 1, 2, cfg.block_size]]))
    with pytest.raises(ValueError, match="tokens"):
        model(torch.tensor([[0, 1, 2, cfg.vocab_size]]), torch.arange(4)[None])
    with pytest.raises(ValueError, match="pos shape"):
        model(idx, torch.arange(5)[None])


# ------------------------------------------------------------------------------------------ LRAS: KV prefix

def test_kv_prefix_equals_one_causal_pass_and_logits_index():
    model, cfg = _nano(1)
    g = torch.Generator().manual_seed(3)
    B, Tp, Tn = 2, 17, 9
    idx = torch.randint(0, cfg.vocab_size, (B, Tp + Tn), generator=g)
    pos = torch.randperm(cfg.block_size, generator=g)[: Tp + Tn].expand(B, -1)
    with torch.no_grad():
        full = model(idx, pos)                                                   # [B, Tp+Tn, V]
        pre_logits, cache = model(idx[:, :Tp], pos[:, :Tp], return_kv=True)
        new = model(idx[:, Tp:], pos[:, Tp:], past_kv=cache)
        sel = torch.tensor([0, 4, 8, 2])
        picked = model(idx[:, Tp:], pos[:, Tp:], past_kv=cache, logits_index=sel)
    assert len(cache) == cfg.n_layer and cache[0][0].shape == (B, cfg.n_head, Tp, cfg.n_embd // cfg.n_head)
    assert (full[:, :Tp] - pre_logits).abs().max() <= 1e-5
    assert (full[:, Tp:] - new).abs().max() <= 1e-5
    assert picked.shape == (B, 4, cfg.vocab_size)
    assert (full[:, Tp:][:, sel] - picked).abs().max() <= 1e-5
    # the check can fail: new tokens attending to nothing but themselves give different logits
    with torch.no_grad():
        alone = model(idx[:, Tp:], pos[:, Tp:])
    assert (alone - full[:, Tp:]).abs().max() > 1e-2


def test_kv_prefix_chained_in_three_chunks_returns_the_whole_cache():
    model, cfg = _nano(2)
    g = torch.Generator().manual_seed(4)
    T = 30
    idx = torch.randint(0, cfg.vocab_size, (1, T), generator=g)
    pos = torch.arange(T)[None] * 7
    with torch.no_grad():
        full = model(idx, pos)
        _, c1 = model(idx[:, :10], pos[:, :10], return_kv=True)
        _, c2 = model(idx[:, 10:21], pos[:, 10:21], past_kv=c1, return_kv=True)
        last = model(idx[:, 21:], pos[:, 21:], past_kv=c2)
    assert c2[1][1].shape[2] == 21
    assert (full[:, 21:] - last).abs().max() <= 1e-5


def test_batch1_prefix_broadcasts_over_the_batch():
    model, cfg = _nano(5)
    g = torch.Generator().manual_seed(6)
    Tp, Tn, B = 20, 8, 3
    prefix = torch.randint(0, cfg.vocab_size, (1, Tp), generator=g)
    ppos = torch.arange(Tp)[None] * 3
    new = torch.randint(0, cfg.vocab_size, (B, Tn), generator=g)              # different content per row
    npos = 100 + torch.stack([torch.randperm(50, generator=g)[:Tn] for _ in range(B)])
    with torch.no_grad():
        _, cache = model(prefix, ppos, return_kv=True)                         # computed once, batch 1
        got, full_cache = model(new, npos, past_kv=cache, return_kv=True, logits_index=torch.arange(2, Tn))
        for b in range(B):
            want = model(torch.cat([prefix, new[b:b + 1]], 1), torch.cat([ppos, npos[b:b + 1]], 1))
            assert (want[0, Tp + 2:] - got[b]).abs().max() <= 1e-5
    assert full_cache[0][0].shape[:3] == (B, cfg.n_head, Tp + Tn)
    with pytest.raises(ValueError, match="past_kv batch"):
        bad = [(k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)) for k, v in cache]
        model(new, npos, past_kv=bad)


def test_bf16_autocast_path_runs_on_cpu():
    model, cfg = _nano(7)
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    pos = torch.arange(12)[None]
    with torch.no_grad():
        ref = model(idx, pos)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, cache = model(idx[:, :8], pos[:, :8], return_kv=True)
            out = model(idx[:, 8:], pos[:, 8:], past_kv=cache)
    assert cache[0][0].dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()
    assert (out.float() - ref[:, 8:]).abs().max() < 0.25                     # bf16 rounding only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_7b_random_bf16_first_logits_pass_on_gpu():
    cfg = PRESETS["7b_rgb"]
    with torch.device("meta"):
        model = LRAS(cfg)
    model = model.to(dtype=torch.bfloat16).to_empty(device="cuda")
    model.init_weights()
    model.eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    # first-logits sequence: frame 0 (1024 x 5), 102 revealed frame-1 patches (x 5), 922 masked pointers
    n_prefix, n_rev, n_mask = 5120, 510, 922
    T = n_prefix + n_rev + n_mask
    idx = torch.randint(0, 65536, (1, T), device="cuda", generator=g)
    idx[0, -n_mask:] = 66560 + torch.arange(n_mask, device="cuda")
    pos = torch.randperm(cfg.block_size, device="cuda", generator=g)[:T][None]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        _, cache = model(idx[:, :n_prefix], pos[:, :n_prefix], return_kv=True)
        logits = model(idx[:, n_prefix:].expand(2, -1), pos[:, n_prefix:], past_kv=cache,
                       logits_index=torch.arange(n_rev, n_rev + n_mask, device="cuda"))
    assert logits.shape == (2, n_mask, cfg.vocab_size)
    assert torch.isfinite(logits.float()).all()
    assert (logits[0] - logits[1]).abs().max() == 0


# ------------------------------------------------------------------------------------------ LPQ

def test_released_lpq_keys_and_sizes_on_meta():
    with torch.device("meta"):
        lpq = LPQ(LPQ_PRESETS["released_rgb"])
    sd = lpq.state_dict()
    ref = reference_lpq_shapes()
    assert set(sd) == set(ref)
    assert {k: tuple(v.shape) for k, v in sd.items()} == ref
    check_state_dict(lpq, meta_sd(ref, torch.float32))
    lpq.load_state_dict(meta_sd(ref, torch.float32), strict=True, assign=True)
    count = lambda pre: sum(p.numel() for n, p in lpq.named_parameters() if n.startswith(pre))
    # reference §1.4: encoder 1.08 M, LFQ projections 17 k, decoder 38.65 M, about 39.7 M in all
    assert round(count("encoder") / 1e4) == 108 and round(count("quantizer") / 1e3) == 17
    assert round(count("decoder") / 1e4) == 3865 and round(sum(p.numel() for p in lpq.parameters()) / 1e5) == 397


@pytest.fixture(scope="module")
def tiny_lpq():
    torch.manual_seed(0)
    lpq = LPQ(LPQ_PRESETS["tiny"]).eval()
    with torch.no_grad():                         # a less symmetric projection so that many codes occur
        lpq.quantizer.project_in.bias.normal_(0, 0.3)
    return lpq


def test_lfq_mask_is_msb_first_and_matches_the_library(tiny_lpq):
    bits = tiny_lpq.config.codebook_bits
    q = tiny_lpq.quantizer
    assert q.mask.tolist() == [2 ** (bits - 1 - i) for i in range(bits)]
    assert "quantizer.mask" in tiny_lpq.state_dict()
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        codes = tiny_lpq.quantize(x)
        z = tiny_lpq.encode(x)
        h = q.project_in(z.permute(0, 2, 3, 1))                               # [B, h, w, bits]
        lib_quantized, lib_idx, _ = q(z)                                        # the library's own LFQ forward
    assert codes.shape == (2, 8, 12) and codes.dtype == torch.long
    # first projected dimension is the most significant bit
    want = sum((h[..., i] > 0).long() * 2 ** (bits - 1 - i) for i in range(bits))
    assert torch.equal(codes, want)
    assert torch.equal(codes, lib_idx.long())
    assert len(codes.unique()) > 10
    # decoding an index: bits -> +-1 -> L2-normalised -> project_out, equal to what the quantizer produced
    assert torch.allclose(tiny_lpq.code_vectors(codes), lib_quantized, atol=1e-6)
    raw = q.indices_to_codes(torch.tensor([[[2 ** (bits - 1)]]]), project_out=False)[0, :, 0, 0]
    assert raw[0] > 0 and (raw[1:] < 0).all() and torch.allclose(raw.abs(), torch.full((bits,), bits ** -0.5))
    assert torch.equal(codes_to_bits(codes, bits), (h > 0).long())
    assert torch.equal(bits_to_codes(codes_to_bits(codes, bits)), codes)


def test_encoder_is_strictly_local(tiny_lpq):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, 32, 32, generator=g)
    y = x.clone()
    y[0, :, 13, 6] += 5.0                                                     # pixel in 4x4 block (3, 1)
    with torch.no_grad():
        zx, zy = tiny_lpq.encode(x), tiny_lpq.encode(y)
        cx, cy = tiny_lpq.quantize(x), tiny_lpq.quantize(y)
    changed = (zx - zy).abs().amax(1)[0] > 0                                  # [8, 8]
    expect = torch.zeros(8, 8, dtype=torch.bool)
    expect[3, 1] = True
    assert torch.equal(changed, expect)
    others = torch.ones(8, 8, dtype=torch.bool)
    others[3, 1] = False
    assert torch.equal(cx[0][others], cy[0][others])
    # each code is a function of its own 4x4 block alone
    with torch.no_grad():
        crop = tiny_lpq.quantize(x[:, :, 12:16, 4:8])
    assert crop.shape == (1, 1, 1) and crop.item() == cx[0, 3, 1].item()


def test_lpq_decode_forward_and_training_step(tiny_lpq):
    x = normalize(torch.rand(2, 3, 16, 24) * 255)
    with torch.no_grad():
        codes = tiny_lpq.quantize(x)
        rec = tiny_lpq.decode(codes)
    assert rec.shape == x.shape
    lpq = LPQ(LPQ_PRESETS["tiny"]).train()
    y, mse, aux = lpq(x)
    assert y.shape == x.shape and torch.isfinite(mse) and torch.isfinite(aux) and aux.ndim == 0
    (mse + aux).backward()
    assert lpq.encoder[0].weight.grad.abs().sum() > 0 and lpq.decoder[-1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny_lpq.quantize(torch.zeros(1, 3, 10, 12))
    with pytest.raises(ValueError, match="codes must lie"):
        tiny_lpq.decode(torch.full((1, 2, 2), 256))


def test_normalize_roundtrip_and_config_checks():
    img = torch.rand(2, 3, 5, 7) * 255
    assert torch.allclose(denormalize(normalize(img)), img, atol=1e-4)
    assert torch.allclose(normalize(torch.full((1, 3, 1, 1), 0.485 * 255))[0, 0], torch.zeros(1, 1), atol=1e-6)
    with pytest.raises(ValueError, match="upsampling"):
        LPQConfig(patch_size=8)
    with pytest.raises(ValueError, match="embed_dim"):
        LPQConfig(embed_dim=256)
