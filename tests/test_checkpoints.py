"""Checkpoints: safetensors + JSON round trips, clear errors for wrong/truncated files, released-pickle conversion
only with --trust-pickle, and the teacher bundle."""
import dataclasses
import json
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline import cli
from teacher import checkpoints as ck
from teacher.checkpoints import (CheckpointError, convert_released, load_lpq, load_lras, load_teacher_bundle,
                                 save_model, save_teacher_bundle)
from teacher.lpq import LPQ, PRESETS as LPQ_PRESETS, normalize
from teacher.lras import LRAS, PRESETS, LRASConfig

torch.set_num_threads(1)

TINY_LAYOUT = {"n_codes": 256, "grid": 8, "codes_per_side": 2, "ptr0_offset": 256, "ptr1_offset": 320,
               "pos0_offset": 0, "pos1_offset": 320}


@pytest.fixture
def no_torch_load(monkeypatch):
    """Any torch.load call fails the test."""
    def boom(*a, **k):
        raise AssertionError(f"torch.load called with {a[:1]}")
    monkeypatch.setattr(torch, "load", boom)


def _lras(seed=0, cfg=None):
    torch.manual_seed(seed)
    m = LRAS(cfg or PRESETS["nano"]).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def _lpq(seed=0):
    torch.manual_seed(seed)
    m = LPQ(LPQ_PRESETS["tiny"]).eval()
    with torch.no_grad():
        m.quantizer.project_in.bias.normal_(0, 0.3)
    return m


def _lras_out(m):
    g = torch.Generator().manual_seed(9)
    idx = torch.randint(0, m.config.vocab_size, (2, 15), generator=g)
    pos = torch.randint(0, m.config.block_size, (2, 15), generator=g)
    with torch.no_grad():
        return m(idx, pos)


def _lpq_out(m):
    x = normalize(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 255)
    with torch.no_grad():
        c = m.quantize(x)
        return c, m.decode(c)


# ------------------------------------------------------------------------------------------ our format

def test_save_and_load_lras_config_from_json_not_presets(tmp_path, no_torch_load):
    cfg = LRASConfig(n_layer=3, n_head=3, n_embd=48, vocab_size=300, block_size=200)   # no preset has this
    m = _lras(1, cfg)
    path = save_model(m, tmp_path / "m.safetensors", extra={"note": "x"})
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["kind"] == "lras" and meta["config"]["n_embd"] == 48 and meta["extra"] == {"note": "x"}
    assert not list(tmp_path.glob(".*partial"))                               # temporaries are gone
    back = load_lras(path)
    assert back.config == cfg and not back.training
    assert torch.equal(_lras_out(back), _lras_out(m))
    with pytest.raises(CheckpointError, match="holds a lras model"):
        load_lpq(path)


def test_save_and_load_lpq(tmp_path, no_torch_load):
    m = _lpq(2)
    save_model(m, tmp_path / "q.safetensors")
    back = load_lpq(tmp_path / "q.safetensors")
    assert back.config == m.config
    c0, r0 = _lpq_out(m)
    c1, r1 = _lpq_out(back)
    assert torch.equal(c0, c1) and torch.equal(r0, r1)
    assert back.quantizer.mask.dtype == torch.int64


def test_save_model_rejects_a_config_that_is_not_the_models(tmp_path):
    m = _lras()
    bad = dataclasses.asdict(m.config) | {"n_layer": 5}
    with pytest.raises(ValueError, match="does not describe"):
        save_model(m, tmp_path / "m.safetensors", bad)
    with pytest.raises(ValueError, match=".safetensors"):
        save_model(m, tmp_path / "m.pt")


def test_truncated_corrupt_and_missing_files_name_the_file(tmp_path, no_torch_load):
    path = save_model(_lras(), tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*(truncated|corrupt)"):
        load_lras(path)
    path.write_bytes(data[:20])
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*truncated"):
        load_lras(path)
    path.write_bytes(b"not a safetensors file at all, just text" * 3)
    with pytest.raises(CheckpointError, match=r"m\.safetensors"):
        load_lras(path)
    path.write_bytes(data)
    load_lras(path)                                                           # intact again
    (tmp_path / "m.json").unlink()
    with pytest.raises(CheckpointError, match=r"m\.json not found"):
        load_lras(path)
    with pytest.raises(CheckpointError, match=r"nope\.safetensors.*not found"):
        ck.read_safetensors(tmp_path / "nope.safetensors")


def test_wrong_shape_in_file_names_the_tensor(tmp_path):
    m = _lras()
    path = save_model(m, tmp_path / "m.safetensors")
    sd = load_file(str(path))
    sd["transformer.h.1.attn.c_proj.weight"] = torch.zeros(32, 31)
    save_file(sd, str(path))
    with pytest.raises(ValueError, match=r"m\.safetensors.*transformer\.h\.1\.attn\.c_proj\.weight.*\(32, 31\)"):
        load_lras(path)
    del sd["transformer.h.1.attn.c_proj.weight"]
    save_file(sd, str(path))
    with pytest.raises(ValueError, match=r"missing key.*transformer\.h\.1\.attn\.c_proj\.weight"):
        load_lras(path)


# ------------------------------------------------------------------------------------------ released pickles

def _released_lras(tmp_path, m, cfg_extra=None, cfg_obj=None):
    """A fake released LRAS checkpoint: compiled-model prefixes, cfg dict with config_class, optimizer state."""
    cfg = {"config_class": "lras_3d.config.LRAS7B_Patch8_RGBConfig", **dataclasses.asdict(m.config),
           "patch_size": 2, **(cfg_extra or {})}
    ckpt = {"model": {"_orig_mod." + k: v.clone() for k, v in m.state_dict().items()},
            "cfg": cfg if cfg_obj is None else cfg_obj, "optimizer": {"state": {}, "param_groups": []}, "step": 7}
    path = tmp_path / "rgb_predictor.pt"
    torch.save(ckpt, path)
    return path


def _released_lpq(tmp_path, m):
    c = m.config
    stages = []
    for s, ch in enumerate(c.dec_channels):
        if s:
            stages.append(("Upsample", c.dec_channels[s - 1], ch))
        stages += [("ResBlock", ch, ch, 2 * ch, 3, 1, 1)] * c.n_res
    cfg = {"model_class": "x.LPQ", "patch_size": 4, "dropout": 0.1, "vocab_size": 256, "num_codebooks": 1,
           "num_in_channels": 3, "num_out_channels": 3,
           "encoder_blocks": [("ResBlock", c.embed_dim, c.embed_dim, c.enc_hidden, 1, 1, 0)],
           "decoder_blocks": stages}
    path = tmp_path / "rgb_quantizer.pt"
    torch.save({"weights": {"_orig_module." + k: v.clone() for k, v in m.state_dict().items()}, "cfg": cfg}, path)
    return path


def test_convert_refuses_without_trust_pickle(tmp_path, capsys, no_torch_load):
    src = _released_lras(tmp_path, _lras())                                   # torch.save only
    out = tmp_path / "out.safetensors"
    rc = cli.main(["convert-lras", str(src), str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "rgb_predictor.pt" in err and "refusing to unpickle" in err and "--trust-pickle" in err
    assert not out.exists() and not (tmp_path / "out.json").exists()
    with pytest.raises(ck.UntrustedPickleError):
        convert_released(src, out, trust_pickle=False)


def test_convert_lras_with_trust_pickle_loads_back_strict_with_identical_outputs(tmp_path, capsys):
    m = _lras(3)
    src = _released_lras(tmp_path, m)
    out = tmp_path / "lras.safetensors"
    assert cli.main(["convert-lras", str(src), str(out), "--trust-pickle"]) == 0
    assert "LRAS n_layer=2 n_head=2" in capsys.readouterr().out
    meta = json.loads((tmp_path / "lras.json").read_text())
    assert meta["kind"] == "lras" and meta["config"] == dataclasses.asdict(m.config)
    assert meta["extra"]["converted_from"] == "rgb_predictor.pt" and len(meta["extra"]["source_sha256"]) == 64
    assert meta["extra"]["released_cfg"]["config_class"].endswith("LRAS7B_Patch8_RGBConfig")
    assert not any(k.startswith("_orig") for k in load_file(str(out)))
    back = load_lras(out)
    assert torch.equal(_lras_out(back), _lras_out(m))


def test_convert_lpq_and_dtype_cast(tmp_path):
    m = _lpq(4)
    src = _released_lpq(tmp_path, m)
    out = tmp_path / "lpq.safetensors"
    info = convert_released(src, out, trust_pickle=True)
    assert info["kind"] == "lpq" and info["config"]["codebook_bits"] == 8 and info["config"]["dec_channels"] == [64, 32, 16]
    back = load_lpq(out)
    c0, r0 = _lpq_out(m)
    c1, r1 = _lpq_out(back)
    assert torch.equal(c0, c1) and torch.equal(r0, r1)
    out16 = tmp_path / "lras16.safetensors"
    convert_released(_released_lras(tmp_path, _lras()), out16, trust_pickle=True, dtype=torch.bfloat16)
    assert {t.dtype for t in load_file(str(out16)).values()} == {torch.bfloat16}
    assert load_lras(out16, dtype=torch.float32).lm_head.weight.dtype == torch.float32


def test_convert_reads_cfg_of_an_unimportable_class(tmp_path):
    """The released cfg may be an object of the original code base's class; it is read without importing it."""
    mod = types.ModuleType("fd_fake_released_cfg")

    @dataclasses.dataclass
    class FakeCfg:
        n_layer: int = 2
        n_head: int = 2
        n_embd: int = 32
        vocab_size: int = 384
        block_size: int = 640
    FakeCfg.__module__, FakeCfg.__qualname__ = mod.__name__, "FakeCfg"
    mod.FakeCfg = FakeCfg
    sys.modules[mod.__name__] = mod
    try:
        src = _released_lras(tmp_path, _lras(), cfg_obj=FakeCfg())
    finally:
        del sys.modules[mod.__name__]
    info = convert_released(src, tmp_path / "o.safetensors", trust_pickle=True)
    assert info["config"]["n_head"] == 2 and info["config"]["n_layer"] == 2


def test_convert_clear_errors(tmp_path, capsys):
    m = _lras()
    out = tmp_path / "o.safetensors"
    bad = _released_lras(tmp_path, m, {"vocab_size": 999})
    with pytest.raises(CheckpointError, match="vocab_size=999 but the tensors say 384"):
        convert_released(bad, out, trust_pickle=True)
    nohead = tmp_path / "nohead.pt"
    torch.save({"model": m.state_dict(), "cfg": {}}, nohead)
    with pytest.raises(CheckpointError, match="n_head"):
        convert_released(nohead, out, trust_pickle=True)
    junk = tmp_path / "junk.pt"
    torch.save({"model": {"foo.weight": torch.zeros(2)}, "cfg": {}}, junk)
    with pytest.raises(CheckpointError, match="neither an LRAS nor an LPQ"):
        convert_released(junk, out, trust_pickle=True)
    text = tmp_path / "text.pt"
    text.write_text("hello")
    assert cli.main(["convert-lras", str(text), str(out), "--trust-pickle"]) == 2
    assert "text.pt" in capsys.readouterr().err
    assert not out.exists()


def test_safetensors_input_is_never_unpickled(tmp_path, no_torch_load):
    st = save_model(_lras(), tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="already a safetensors file"):
        convert_released(st, tmp_path / "o.safetensors", trust_pickle=True)
    renamed = tmp_path / "m.pt"
    renamed.write_bytes(st.read_bytes())                                      # content sniffed, not the name
    with pytest.raises(CheckpointError, match="already a safetensors file"):
        convert_released(renamed, tmp_path / "o.safetensors", trust_pickle=True)


# ------------------------------------------------------------------------------------------ teacher bundle

@dataclasses.dataclass(frozen=True)
class _Layout:                      # stands in for teacher.sequence.TokenLayout (not imported by checkpoints)
    n_codes: int = 256
    grid: int = 8
    codes_per_side: int = 2
    ptr0_offset: int = 256
    ptr1_offset: int = 320
    pos0_offset: int = 0
    pos1_offset: int = 320


def test_teacher_bundle_round_trip(tmp_path, no_torch_load):
    lras, lpq = _lras(5, PRESETS["tiny"]), _lpq(6)
    d = tmp_path / "teacher"
    tid = save_teacher_bundle(d, lras, lpq, _Layout(), (64, 64), provenance={"command": "flowdistill train-teacher"},
                              tracer={"sigma": 2.0})
    meta = json.loads((d / "teacher.json").read_text())
    assert meta["format"] == "flowdistill-teacher-v1" and meta["lras"] == "lras.safetensors"
    assert meta["layout"] == TINY_LAYOUT and meta["image_size"] == [64, 64]
    b = load_teacher_bundle(d)
    assert b.teacher_id == tid and len(tid) == 16 and b.layout == TINY_LAYOUT and b.image_size == (64, 64)
    assert b.meta["provenance"]["command"] == "flowdistill train-teacher" and b.meta["tracer"] == {"sigma": 2.0}
    assert torch.equal(_lras_out(b.lras), _lras_out(lras))
    assert torch.equal(_lpq_out(b.lpq)[0], _lpq_out(lpq)[0])
    # same weights and configs -> same id; different weights -> different id
    assert save_teacher_bundle(tmp_path / "again", lras, lpq, TINY_LAYOUT, (64, 64)) == tid
    assert save_teacher_bundle(tmp_path / "other", _lras(7, PRESETS["tiny"]), lpq, TINY_LAYOUT, (64, 64)) != tid


def test_teacher_bundle_rejects_damage_and_inconsistency(tmp_path):
    lras, lpq = _lras(5, PRESETS["tiny"]), _lpq(6)
    d = tmp_path / "t"
    save_teacher_bundle(d, lras, lpq, TINY_LAYOUT, (64, 64))
    f = d / "lpq.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"lpq\.safetensors.*sha256"):
        load_teacher_bundle(d)
    with pytest.raises(CheckpointError, match="n_codes 512"):
        save_teacher_bundle(tmp_path / "x", lras, lpq, TINY_LAYOUT | {"n_codes": 512}, (64, 64))
    with pytest.raises(CheckpointError, match="image_size 128x128"):
        save_teacher_bundle(tmp_path / "x", lras, lpq, TINY_LAYOUT, (128, 128))
    with pytest.raises(CheckpointError, match="pos1_offset"):
        save_teacher_bundle(tmp_path / "x", _lras(0, LRASConfig(block_size=600)), lpq, TINY_LAYOUT, (64, 64))
    with pytest.raises(CheckpointError, match="teacher.json not found"):
        load_teacher_bundle(tmp_path / "empty")
    j = tmp_path / "t" / "teacher.json"
    j.write_text(json.dumps(json.loads(j.read_text()) | {"lras": "../lras.safetensors"}))
    with pytest.raises(CheckpointError, match="inside the bundle"):
        load_teacher_bundle(d)


def test_convert_legacy_pickle_format(tmp_path):
    m = _lras(8)
    src = tmp_path / "legacy.pt"
    torch.save({"model": {"_orig_mod." + k: v for k, v in m.state_dict().items()},
                "cfg": dataclasses.asdict(m.config)}, src, _use_new_zipfile_serialization=False)
    assert src.read_bytes()[:1] == b"\x80"                                   # a raw pickle, not a zip archive
    convert_released(src, tmp_path / "o.safetensors", trust_pickle=True)
    assert torch.equal(_lras_out(load_lras(tmp_path / "o.safetensors")), _lras_out(m))
