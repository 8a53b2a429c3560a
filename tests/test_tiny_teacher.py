"""The tiny copy-head teacher: shapes, consistency of its two likelihood paths, the cost volume, tracing I/O."""
import numpy as np
import pytest
import torch

from teacher.kltrace import KLTraceConfig, TracerModel, kl_trace
from teacher.tiny import TinyTeacher, TinyTeacherConfig

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = TinyTeacher(TinyTeacherConfig(image_size=32, radius=4, n_layer=2, n_embd=32, n_head=2, top_offsets=0))
    return m.eval()


def _frames(seed=0, shift=(2, 3), size=32):
    rng = np.random.default_rng(seed)
    f0 = (rng.random((size, size, 3)) * 255).astype(np.float32)
    f1 = np.roll(f0, shift, axis=(0, 1))                      # content moves by (dy, dx) = shift
    t = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].contiguous()
    return t(f0), t(f1)


def test_is_a_tracer_model(model):
    assert isinstance(model, TracerModel)
    assert model.image_size == (32, 32) and model.cell == 4 and model.kl_center == 2.0


def test_full_distribution_matches_target_likelihood(model):
    f0, f1 = _frames()
    reveal = torch.zeros(model.num_patches, dtype=torch.bool)
    reveal[::7] = True
    with torch.no_grad():
        h = model.heads(f0, f1, reveal, seed=5)
        logp = model.code_logprobs(h)                                  # [1, M, K]
        nll = model.target_nll(h)                                      # [1, M]
    assert logp.shape == (1, int((~reveal).sum()), model.n_codes)
    assert torch.isfinite(logp).all()
    assert torch.allclose(logp.exp().sum(-1), torch.ones(1, logp.shape[1]), atol=1e-4)
    assert torch.allclose(-nll, logp.gather(-1, h["target"][..., None]).squeeze(-1), atol=1e-4)


def test_cost_volume_peaks_at_the_true_shift(model):
    f0, f1 = _frames(shift=(2, 3))
    cv = model.cost_volume(f0, f1)                                     # [1, P, D]
    best = model.offsets[cv[0].argmax(-1)]                              # [P, 2] (dy, dx)
    interior = best.reshape(8, 8, 2)[2:6, 2:6].reshape(-1, 2)           # away from the wrapped border
    assert (interior == torch.tensor([2, 3])).all()


def test_first_code_logprobs_and_order_depends_only_on_seed(model):
    f0, f1 = _frames()
    reveal = torch.zeros(model.num_patches, dtype=torch.bool)
    reveal[:6] = True
    a = model.first_code_logprobs(f0, f1, reveal, seed=3)
    b = model.first_code_logprobs(f0, f1, reveal, seed=3)
    c = model.first_code_logprobs(f0, f1, reveal, seed=4)
    assert a.shape == (1, model.num_patches, model.n_codes)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, reveal] == 0).all()


def test_training_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(1)
    m = TinyTeacher(TinyTeacherConfig(image_size=32, radius=4, n_layer=1, n_embd=32, n_head=2))
    for p in m.lpq.parameters():
        p.requires_grad_(False)
    f0, f1 = _frames(seed=2)
    reveal = torch.zeros(m.num_patches, dtype=torch.bool)
    reveal[::4] = True
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        loss, stats = m.training_loss(f0, f1, reveal, seed=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(stats["nll"])
    assert losses[-1] < losses[0] - 0.05


def test_kl_trace_outputs_finite_and_shaped(model):
    f0, f1 = _frames()
    q = torch.tensor([[10.5, 12.5], [20.5, 8.5], [16.0, 16.0]], dtype=torch.float64)
    img = lambda t: t[0].permute(1, 2, 0).numpy().astype(np.uint8)
    res = kl_trace(model, img(f0), img(f1), q, KLTraceConfig(num_masks=1, zoom_levels=1, crop_margin=4))
    assert res.targets.shape == (3, 2) and res.visible.shape == (3,) and res.score.shape == (3,)
    assert torch.isfinite(res.targets).all() and torch.isfinite(res.score).all()


def test_top_offsets_is_a_close_normalised_approximation(model):
    f0, f1 = _frames(seed=4)
    reveal = torch.zeros(model.num_patches, dtype=torch.bool)
    reveal[::5] = True
    with torch.no_grad():
        h = model.heads(f0, f1, reveal, seed=2)
        full = model.code_logprobs(h)
        model.config.top_offsets = 16
        try:
            top = model.code_logprobs(h)
        finally:
            model.config.top_offsets = 0
    assert torch.allclose(top.exp().sum(-1), torch.ones_like(top[..., 0]), atol=1e-4)
    kl = (full.exp() * (full - top)).sum(-1)
    assert float(kl.max()) < 0.5 and float(kl.mean()) < 0.05


def test_dist_init_is_a_log_space_locality_prior():
    """dist_init: the pooling attention's distance weight lives in log space (learnable at Adam's step size); a
    strong one makes a masked patch take the motion of its nearest revealed patch. The legacy form stays loadable."""
    legacy = TinyTeacher(TinyTeacherConfig(image_size=32, radius=4, n_layer=1, n_embd=32, n_head=2, dist_init=None))
    assert hasattr(legacy, "dist_scale") and not hasattr(legacy, "log_dist")
    with pytest.raises(ValueError, match="dist_init"):
        TinyTeacherConfig(dist_init=0.0)
    torch.manual_seed(0)
    m = TinyTeacher(TinyTeacherConfig(image_size=32, radius=4, n_layer=1, n_embd=32, n_head=2, top_offsets=0,
                                      appearance=False, dist_init=50.0)).eval()
    assert not hasattr(m, "dist_scale") and abs(float(m.log_dist) - np.log(50.0)) < 1e-6
    rng = np.random.default_rng(7)
    f0 = (rng.random((32, 32, 3)) * 255).astype(np.float32)
    f1 = np.concatenate([np.roll(f0, 2, axis=1)[:, :16], np.roll(f0, -2, axis=1)[:, 16:]], axis=1)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None]
    g = m.grid
    reveal = torch.zeros(m.num_patches, dtype=torch.bool)
    reveal[g:2 * g] = reveal[5 * g:6 * g] = True        # rows 1 and 5: half of them in each motion
    with torch.no_grad():
        h = m.heads(t(f0), t(f1), reveal, seed=0)
    masked = h["masked"].tolist()
    for row in (0, 2, 3, 4, 6, 7):
        for col, want in ((0, [0, 2]), (g - 1, [0, -2])):
            d = m.offsets[h["log_m"][0, masked.index(row * g + col)].argmax()].tolist()
            assert d == want, (row, col, d)


def test_bundle_without_dist_init_loads_as_the_legacy_form(tmp_path):
    import json

    from teacher.checkpoints import load_tiny_bundle, save_tiny_bundle

    torch.manual_seed(0)
    old = TinyTeacher(TinyTeacherConfig(image_size=32, radius=4, n_layer=1, n_embd=32, n_head=2, dist_init=None))
    save_tiny_bundle(tmp_path / "b", old, provenance={"test": True})
    tj = tmp_path / "b" / "teacher.json"
    meta = json.loads(tj.read_text())
    del meta["config"]["dist_init"]                      # as written before the field existed
    tj.write_text(json.dumps(meta))
    model, _ = load_tiny_bundle(tmp_path / "b")
    assert model.config.dist_init is None and torch.equal(model.dist_scale, old.dist_scale)


def test_set_bundle_tracer_updates_settings_not_weights(tmp_path):
    from teacher.checkpoints import load_tiny_bundle, save_tiny_bundle, set_bundle_tracer

    torch.manual_seed(0)
    m = TinyTeacher(TinyTeacherConfig(image_size=32, radius=4, n_layer=1, n_embd=32, n_head=2))
    tid = save_tiny_bundle(tmp_path / "b", m, provenance={"command": "train"}, tracer={"sigma": 1.0})
    new = set_bundle_tracer(tmp_path / "b", {"occ_threshold": 0.61}, {"command": "calibrate", "auc": 0.86})
    assert new == {"sigma": 1.0, "occ_threshold": 0.61}
    _, meta = load_tiny_bundle(tmp_path / "b")
    assert meta["teacher_id"] == tid and meta["tracer"] == new
    assert meta["provenance"]["command"] == "train"
    assert meta["provenance"]["tracer_updates"] == [{"set": {"occ_threshold": 0.61}, "command": "calibrate",
                                                     "auc": 0.86}]
    with pytest.raises(ValueError, match="occ_treshold"):
        set_bundle_tracer(tmp_path / "b", {"occ_treshold": 0.5})
    assert load_tiny_bundle(tmp_path / "b")[1]["tracer"] == new          # a refused update writes nothing
