"""``flowdistill train-teacher``: the pair dataset, the two Lightning stages, resume, bad inputs, the tiny bundle
and its use as a tracing teacher (``flow --teacher``, the ``kltrace`` source)."""
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.cli import main
from pipeline.train_teacher import DEFAULTS
from teacher.train import ClipPairDataset, TeacherModule, lr_factor

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]

# a tiny run: 2 synthetic 32x32 videos of 8 frames, a 1-layer model, 2 LPQ + 3 teacher steps
TINY = ["--set", "synth.num_videos=2", "--set", "synth.num_frames=8", "--set", "synth.size=[32,32]",
        "--set", "synth.points.per_video=8",
        "--set", "image_size=32", "--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set", "model.n_head=2",
        "--set", "model.radius=4", "--set", "lpq_steps=2", "--set", "teacher_steps=3", "--set", "batch_size=2",
        "--set", "warmup_steps=1", "--set", "progress=false", "--set", "threads=1", "--set", "log_every=1"]


# ---------------------------------------------------------------------------------------------- dataset

def _clips():
    """Clip c, frame t: channel 0 = 10 * c + t everywhere, channel 1 = a left-to-right ramp (shows flips)."""
    out = []
    for c, T in enumerate((6, 10, 3)):
        x = np.zeros((T, 4, 8, 3), np.uint8)
        x[..., 0] = (10 * c + np.arange(T))[:, None, None]
        x[..., 1] = np.arange(8)[None, None, :] * 10
        out.append(torch.from_numpy(x))
    return out


def _decode(f):
    v = int(f[0, 0, 0])
    return v // 10, v % 10, bool(f[1, 0, 0] > f[1, 0, -1])      # clip, t, flipped


def _take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def test_pair_dataset_gaps_shots_augmentation_and_determinism():
    shots = [None, [(0, 5), (5, 10)], None]
    ds = ClipPairDataset(_clips(), gap_range=(1, 3), seed=7, shots=shots)
    pairs = _take(ds, 400)
    gaps, flips, revs = set(), set(), set()
    for f0, f1 in pairs:
        assert f0.dtype == torch.float32 and f0.shape == (3, 4, 8) and float(f0.max()) <= 255
        c0, t0, fl0 = _decode(f0)
        c1, t1, fl1 = _decode(f1)
        assert c0 == c1 and fl0 == fl1                         # same clip, both frames flipped or neither
        assert 1 <= abs(t1 - t0) <= 3
        if c0 == 1:
            assert (t0 < 5) == (t1 < 5)                        # never across the cut at frame 5
        gaps.add(abs(t1 - t0))
        flips.add(fl0)
        revs.add(t1 < t0)
    assert gaps == {1, 2, 3} and flips == {True, False} and revs == {True, False}
    # clip 2 has 3 frames: gap 3 never comes from it
    assert all(abs(_decode(b)[1] - _decode(a)[1]) < 3 for a, b in pairs if _decode(a)[0] == 2)

    again = _take(ClipPairDataset(_clips(), gap_range=(1, 3), seed=7, shots=shots), 50)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(pairs, again))
    other = _take(ClipPairDataset(_clips(), gap_range=(1, 3), seed=8, shots=shots), 50)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(pairs, other))
    moved = ClipPairDataset(_clips(), gap_range=(1, 3), seed=7, shots=shots)
    moved.set_start_step(100)                                   # a resumed run does not replay the first pairs
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(pairs, _take(moved, 50)))

    plain = _take(ClipPairDataset(_clips(), gap_range=(0, 0), seed=1, flip=False, reverse=False), 50)
    assert all(torch.equal(a, b) and not _decode(a)[2] for a, b in plain)
    fwd = _take(ClipPairDataset(_clips(), gap_range=(2, 2), seed=1, reverse=False), 50)
    assert all(_decode(b)[1] - _decode(a)[1] == 2 for a, b in fwd)
    with pytest.raises(ValueError, match="long enough"):
        ClipPairDataset(_clips(), gap_range=(12, 14))
    with pytest.raises(ValueError, match="same size|one size"):
        ClipPairDataset([torch.zeros(3, 4, 8, 3, dtype=torch.uint8), torch.zeros(3, 5, 8, 3, dtype=torch.uint8)])


def test_teacher_module_draws_and_schedule():
    class Stub(torch.nn.Module):
        num_patches = 64

        def __init__(self):
            super().__init__()
            self.lpq = torch.nn.Linear(2, 2)
            self.w = torch.nn.Parameter(torch.zeros(()))

    m = TeacherModule(Stub(), reveal_range=(0.1, 0.3), seed=3)
    assert not any(p.requires_grad for p in m.model.lpq.parameters())
    m.train()
    assert not m.model.lpq.training
    for step in range(20):
        reveal, order_seed, r = m.draw(step)
        assert reveal.dtype == torch.bool and reveal.shape == (64,)
        assert 0.1 <= r <= 0.3 and int(reveal.sum()) == round(r * 64)
        again = m.draw(step)
        assert torch.equal(again[0], reveal) and again[1] == order_seed
    assert not torch.equal(m.draw(0)[0], m.draw(1)[0])
    assert lr_factor(0, 100, 10) == pytest.approx(0.1) and lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(55, 100, 10, schedule="constant") == 1.0


# ---------------------------------------------------------------------------------------------- config

def test_yaml_equals_defaults_and_model_defaults_match_tiny_config():
    from teacher.tiny import TinyTeacherConfig

    assert yaml.safe_load((REPO / "configs/teacher/tiny_train.yaml").read_text()) == DEFAULTS
    own = {f.name: f.default for f in dataclasses.fields(TinyTeacherConfig) if f.name != "image_size"}
    assert DEFAULTS["model"] == own
    assert DEFAULTS["image_size"] == TinyTeacherConfig().image_size


# ---------------------------------------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One tiny run over the synthetic set + a real mp4 + a file that is not a video."""
    from badinputs import make_good_video

    d = tmp_path_factory.mktemp("train")
    vids = d / "videos"
    make_good_video(vids / "good.mp4", n_frames=6, size=(40, 30))
    bad = d / "not_video.mp4"
    bad.write_bytes(b"this is not a video" * 10)
    srcs = f"sources=[\"synth:\", \"{vids}\", \"{bad}\"]"
    argv = ["train-teacher", "--set", srcs, *TINY, "--out", str(d / "out"), "--work-dir", str(d / "work")]
    rc = main(argv)
    assert rc == 0
    return d, argv


def test_run_writes_loadable_bundle_with_provenance(run_dir):
    from teacher.checkpoints import load_any_teacher, load_tiny_bundle
    from teacher.tiny import TinyTeacher

    d, argv = run_dir
    model, meta = load_tiny_bundle(d / "out")
    assert isinstance(model, TinyTeacher) and not model.training and meta["kind"] == "tiny"
    assert meta["config"]["image_size"] == 32 and meta["config"]["n_layer"] == 1
    p = meta["provenance"]
    assert p["command"].startswith("flowdistill train-teacher --set") and "teacher_steps=3" in p["command"]
    assert p["argv"][2:] == argv[1:]
    assert p["steps"] == {"lpq": 2, "teacher": 3} and p["seed"] == 0
    assert p["config"]["lpq_steps"] == 2 and p["versions"]["torch"] == torch.__version__
    data = p["data"]
    assert data["num_videos"] == 3 and data["num_frames"] == 8 + 8 + 6
    assert [v["uri"] for v in data["videos"]][:2] == ["synth:train_0000", "synth:train_0001"]
    assert all(len(v["sha256"]) == 64 for v in data["videos"][:2])
    assert data["synthetic"]["num_videos"] == 2 and p["metrics"] is None
    # the LPQ inside the bundle is the stage-1 LPQ
    from teacher.checkpoints import load_lpq

    lpq = load_lpq(d / "work" / "lpq.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(lpq.state_dict().values(), model.lpq.state_dict().values()))
    tracer = load_any_teacher(d / "out")
    assert tracer.teacher_kind == "tiny" and tracer.teacher_id == meta["teacher_id"]
    logp = tracer.first_code_logprobs(torch.rand(1, 3, 32, 32) * 255, torch.rand(1, 3, 32, 32) * 255,
                                      torch.arange(64) % 5 == 0, seed=1)
    assert logp.shape == (1, 64, 256) and torch.isfinite(logp).all()


def test_bad_video_is_recorded_and_skipped(run_dir):
    d, _ = run_dir
    lines = [json.loads(x) for x in (d / "work" / "errors.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["input"].endswith("not_video.mp4")
    meta = json.loads((d / "out" / "teacher.json").read_text())
    assert meta["provenance"]["data"]["errors"][0]["input"].endswith("not_video.mp4")


def test_rerun_skips_finished_stages_and_longer_run_resumes(run_dir, capsys):
    d, argv = run_dir
    work = d / "work"
    state0 = json.loads((work / "stages.json").read_text())
    mt = {s: os.stat(work / s / "last.ckpt").st_mtime_ns for s in ("lpq", "teacher")}
    tid0 = json.loads((d / "out" / "teacher.json").read_text())["teacher_id"]
    capsys.readouterr()

    assert main(argv) == 0                                      # the same command again: nothing retrained
    out = capsys.readouterr().out
    assert "stage lpq: done (2 steps), skipped" in out and "stage teacher: done (3 steps), skipped" in out
    assert json.loads((work / "stages.json").read_text()) == state0
    assert {s: os.stat(work / s / "last.ckpt").st_mtime_ns for s in ("lpq", "teacher")} == mt
    assert json.loads((d / "out" / "teacher.json").read_text())["teacher_id"] == tid0

    assert main(argv + ["--set", "teacher_steps=5"]) == 0      # more steps: resume the teacher from last.ckpt
    state = json.loads((work / "stages.json").read_text())
    assert state["stages"]["lpq"] == state0["stages"]["lpq"]
    assert state["stages"]["teacher"]["steps"] == 5
    assert [r["from"] for r in state["stages"]["teacher"]["runs"]] == [0, 3]
    meta = json.loads((d / "out" / "teacher.json").read_text())
    assert meta["provenance"]["steps"] == {"lpq": 2, "teacher": 5} and meta["teacher_id"] != tid0

    # another config in the same work_dir is refused, naming the key
    assert main(argv + ["--set", "lr=0.01"]) == 2
    assert "lr" in capsys.readouterr().err


def test_tiny_bundle_traces_through_flow_and_kltrace(run_dir, tmp_path, capsys):
    from PIL import Image

    from pipeline.flowsources import make_flow_source

    d, _ = run_dir
    rng = np.random.default_rng(0)
    f0 = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    f1 = np.roll(f0, (1, 2), axis=(0, 1))
    Image.fromarray(f0).save(tmp_path / "f0.png")
    Image.fromarray(f1).save(tmp_path / "f1.png")
    rc = main(["flow", "--teacher", str(d / "out"), str(tmp_path / "f0.png"), str(tmp_path / "f1.png"),
               "--points", "10,12", "--out", str(tmp_path / "o"), "--set", "tracer.num_masks=1",
               "--set", "tracer.zoom_levels=1", "--set", "threads=1"])
    assert rc == 0
    res = json.loads((tmp_path / "o" / "targets.json").read_text())
    assert res["engine"] == {"enabled": False} and len(res["targets"]) == 1    # tiny kind: naive KL maps
    src = make_flow_source("kltrace", {"teacher": str(d / "out"), "tracer": {"num_masks": 1, "zoom_levels": 1}})
    assert src.engine is None
    tg, vis = src.track(f0, f1, np.array([[10.0, 12.0], [30.5, 20.0]], np.float32))
    assert tg.shape == (2, 2) and vis.shape == (2,) and np.isfinite(tg).all()


def test_evaluate_hook_and_tracer_settings_reach_the_bundle(run_dir, tmp_path):
    from pipeline.config import load_config
    from pipeline.train_teacher import train_teacher

    d, argv = run_dir
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(None, overrides + ["tracer={num_masks: 1}"], DEFAULTS)
    cfg.update(out=str(tmp_path / "out2"), work_dir=str(d / "work"))
    seen = []

    def evaluate(bundle_dir):
        seen.append(json.loads((Path(bundle_dir) / "teacher.json").read_text())["tracer"])
        return {"kltrace": {"ad": 1.5}}

    res = train_teacher(cfg, command=["flowdistill", "train-teacher"], evaluate_fn=evaluate)
    assert seen == [{"num_masks": 1}]                            # evaluated with the settings it is published with
    meta = json.loads((tmp_path / "out2" / "teacher.json").read_text())
    assert meta["provenance"]["metrics"] == {"kltrace": {"ad": 1.5}} and res["metrics"] == {"kltrace": {"ad": 1.5}}
    assert meta["tracer"] == {"num_masks": 1} and meta["teacher_id"] == res["teacher_id"]
    with pytest.raises(Exception, match="tracer"):
        train_teacher({**cfg, "tracer": {"num_masks": 0}})
