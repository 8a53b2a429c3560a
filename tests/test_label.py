"""Reliability of ``flowdistill label`` / ``refresh`` (issue 5).

1. equivalence: 1 process == 2 processes (torchrun) == a run stopped by SIGTERM and resumed by 3 env-ranks;
2. fault injection: label workers SIGKILLed at seeded random moments, resumed with other world sizes;
   recovery of orphan / partial shards and lost ledger lines; SIGTERM -> 143 and a resume completes;
3. bad videos among good ones: recorded with reasons, the version completes, the exit status counts them;
4. unwritable output / disk full: exit 2 naming the directory, nothing half-written published, resume works;
5. refresh: dry-run plans, new versions on config change, labels only new videos, ``--keep-old``;
6. ``pipeline.dist``: ranks from torchrun / Slurm array / Slurm tasks / default, bad values, ``owner``.

Everything shares one module-scoped micro teacher, six small videos and one reference labelling (in-process);
labels are compared as ``labelkit.content`` (key -> content hash, producer rank left out).
"""
from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import badinputs  # noqa: E402
from labelkit import REPO, TORCHRUN, clean_env, content, label_cmd, make_teacher  # noqa: E402

from pipeline import manifest as mf  # noqa: E402
from pipeline.common import InputError  # noqa: E402
from pipeline.dist import RankInfo, is_mine, owner, resolve_rank, unit_hash  # noqa: E402
from pipeline.label import FAILED_EXIT_BASE  # noqa: E402
from pipeline.sources import iter_videos  # noqa: E402
from pipeline.shards import check_tar_complete, iter_raw, list_shards, verify_shard  # noqa: E402

N_VIDEOS = 6
EXTRA = ["--set", "sampling.num_points=2"]          # on top of labelkit.FAST: 2 pairs x 2 points per video
KILL_SEED = 20240605
UNIT_LINE = re.compile(r"^\s*\+ (\S+)\s+(.*)$")


# ------------------------------------------------------------------------------------------------ helpers

@contextlib.contextmanager
def environ(**extra):
    """os.environ without launcher variables (plus ``extra``) for an in-process run."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(clean_env(**extra))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def cli(argv: list, **env) -> int:
    """``flowdistill <argv>`` in this process (teacher and imports already loaded: no start-up cost)."""
    from pipeline import cli as cli_mod

    with environ(**env):
        return cli_mod.main([str(a) for a in argv])


def _fork_worker(argv: list, env: dict) -> None:          # runs in a forked child
    os.environ.clear()
    os.environ.update(env)
    from pipeline import cli as cli_mod

    sys.stdout = sys.stderr = open(os.devnull, "w")
    os._exit(cli_mod.main([str(a) for a in argv]))


def spawn(argv: list, env: dict):
    """A label worker forked from this process (teacher and imports already loaded: no start-up cost)."""
    p = multiprocessing.get_context("fork").Process(target=_fork_worker, args=(argv, env))
    p.start()
    return p


def vdir_of(root: Path, version: str = "v0001", name: str = "t") -> Path:
    return Path(root) / name / version


def ledger_units(vdir: Path, rank: int | None = None) -> list[str]:
    paths = [mf.ledger_path(vdir, rank)] if rank is not None else sorted(vdir.glob("ledger-*.jsonl"))
    return [r["unit"] for p in paths for r in mf._read_jsonl(p) if r.get("status") == "done"]


def tree_hash(path: Path) -> dict:
    """relative path -> sha256 of every file under ``path`` (hidden ones included)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(path).rglob("*")) if p.is_file()}


def producer_ranks(vdir: Path) -> dict:
    out = {}
    for e in mf.read_manifest(vdir)["shards"]:
        for raw in iter_raw(vdir / e["shard"]):
            out[raw["__key__"]] = json.loads(raw["meta.json"])["rank"]
    return out


def check_consistent(vdir: Path, ref: dict) -> dict:
    """Invariants that hold at *any* moment, even right after a SIGKILL: every visible ``.tar`` is a complete tar
    (``.partial`` temporaries are hidden from ``list_shards``), indexed shards match their index, no key appears
    twice, every sample equals the reference one, and a ledger line only names units whose samples are in
    indexed shards. Returns the content of the indexed shards."""
    if not (vdir / "version.json").is_file():
        return {}
    visible = sorted(vdir.glob("labels-*.tar"))
    if visible:
        listed = list_shards(vdir)
        assert not [s for s in listed if s.endswith(".partial") or Path(s).name.startswith(".")], listed
        assert sorted(Path(s).name for s in listed) == sorted(p.name for p in visible)
    for p in visible:
        check_tar_complete(p)
    entries = mf.shard_entries(vdir)
    for e in entries:
        verify_shard(vdir / e["shard"], e)
    got = content(vdir)
    assert {k: ref.get(k) for k in got} == got, "a sample differs from the uninterrupted run"
    indexed_units = {k.rsplit("_", 2)[0] for e in entries for k in e["keys"]}
    led = ledger_units(vdir)
    assert len(led) == len(set(led)), f"a unit has two ledger lines: {led}"
    assert set(led) <= indexed_units, "a ledger line names a unit whose samples are not in an indexed shard"
    return got


def check_complete(root: Path, ref: dict | None, version: str = "v0001", name: str = "t") -> tuple[dict, dict]:
    """The version is complete and LATEST names it; the visible shards are exactly the manifest's; no
    temporaries; every shard matches the manifest; content equals ``ref`` (when given)."""
    sdir = Path(root) / name
    vdir = sdir / version
    assert (sdir / "LATEST").read_text().strip() == version
    man = mf.read_manifest(vdir)
    assert man["complete"] is True and man["version"] == version
    assert man["units"]["done"] + man["units"]["failed"] == man["units"]["total"] == len(man["unit_ids"])
    own = sorted(e["shard"] for e in man["shards"] if "/" not in e["shard"])
    assert sorted(p.name for p in vdir.glob("*.tar")) == own, "a visible shard is not in the manifest"
    assert not [p.name for p in vdir.iterdir() if p.name.endswith(".partial")]
    for e in man["shards"]:
        verify_shard(vdir / e["shard"], e)
    got = content(vdir)
    assert man["samples"] == len(got)
    if ref is not None:
        assert got == ref
    led = ledger_units(vdir)
    assert len(led) == len(set(led))
    return man, got


def wait_for(pred, proc=None, timeout: float = 180.0, what: str = "condition") -> None:
    t_end = time.monotonic() + timeout
    while not pred():
        if proc is not None and not proc.is_alive():
            raise AssertionError(f"process exited ({proc.exitcode}) before {what}")
        if time.monotonic() > t_end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------ fixture

@dataclass
class Kit:
    base: Path
    teacher: Path
    vids: Path
    ref_root: Path
    ref: dict                   # key -> content hash of the uninterrupted 1-process run
    units: list                 # unit ids of the six videos
    seconds_per_unit: float     # labelling time per video in the reference run

    def cmd(self, root: Path, extra: list | None = None, sources: list | None = None, set_name: str = "t") -> list:
        """The full command line (``flowdistill label ...``); ``[1:]`` is the in-process argv."""
        return label_cmd(sources or [self.vids], self.teacher, root, set_name, EXTRA + list(extra or []))


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    base = tmp_path_factory.mktemp("label")
    teacher = make_teacher(base / "teacher")
    vids = base / "vids"
    vids.mkdir()
    per_rank = [0, 0]                # half the videos owned by each of 2 ranks: torchrun's ranks share the work
    for seed in range(200, 300):
        cand = badinputs.make_good_video(base / "cand.mp4", n_frames=8, seed=seed)
        (item,) = iter_videos([cand])
        if per_rank[owner(item.id, 2)] < N_VIDEOS // 2:
            per_rank[owner(item.id, 2)] += 1
            cand.rename(vids / f"v{seed}.mp4")
        if sum(per_rank) == N_VIDEOS:
            break
    root = base / "ref"
    k = Kit(base, teacher, vids, root, {}, [], 0.0)
    assert cli(k.cmd(root)[1:]) == 0
    k.seconds_per_unit = json.loads((vdir_of(root) / "summary-0.json").read_text())["seconds_labeling"] / N_VIDEOS
    man, k.ref = check_complete(root, None)
    k.units = list(man["unit_ids"])
    assert man["units"] == {"total": N_VIDEOS, "done": N_VIDEOS, "failed": 0}
    assert len(k.ref) == 2 * N_VIDEOS
    yield k
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ 1. equivalence

def test_torchrun_two_processes_equal_one_process(kit, tmp_path):
    root = tmp_path / "root"
    owners = {u: owner(u, 2) for u in kit.units}
    assert sorted(owners.values()) == [0, 0, 0, 1, 1, 1]
    r = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "--no-python"] + kit.cmd(root),
                       env=clean_env(OMP_NUM_THREADS=1), capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    check_complete(root, kit.ref)
    vdir = vdir_of(root)
    for rank in (0, 1):
        s = json.loads((vdir / f"summary-{rank}.json").read_text())
        assert (s["rank"], s["world"], s["launcher"], s["stopped"]) == (rank, 2, "torchrun", None)
        assert sorted(ledger_units(vdir, rank)) == sorted(u for u in kit.units if owners[u] == rank)
    assert {k: owners[k.rsplit("_", 2)[0]] for k in kit.ref} == producer_ranks(vdir)


def test_sigterm_then_resume_with_three_ranks(kit, tmp_path):
    """SIGTERM once a unit is published: exit 143, a consistent partial version, no manifest / LATEST; then three
    concurrent ranks (RANK=0..2, WORLD_SIZE=3, as any launcher sets them) finish it: same samples as 1 process.
    (The label processes are forked from this one: the same CLI entry point without the start-up imports.)"""
    root = tmp_path / "root"
    vdir = vdir_of(root)
    argv = kit.cmd(root)[1:]
    p = spawn(argv, clean_env())
    try:
        wait_for(lambda: vdir.is_dir() and ledger_units(vdir), p, what="a first ledger line")
        os.kill(p.pid, signal.SIGTERM)
        p.join(120)
    finally:
        if p.is_alive():
            p.kill()
    assert p.exitcode == 143
    summary = json.loads((vdir / "summary-0.json").read_text())
    assert summary["stopped"] == "signal 15" and summary["units_done"] >= 1
    assert not (vdir / "manifest.json").exists() and not (root / "t" / "LATEST").exists()
    got = check_consistent(vdir, kit.ref)
    done = set(mf.read_state(vdir)["done"])
    assert done == set(ledger_units(vdir)), "a graceful stop writes the ledger line of every published unit"
    assert 0 < len(done) < N_VIDEOS and set(got) == {k for k in kit.ref if k.rsplit("_", 2)[0] in done}
    n0 = len(ledger_units(vdir, 0))

    procs = [spawn(argv, clean_env(RANK=r, WORLD_SIZE=3, LOCAL_RANK=r)) for r in range(3)]
    for q in procs:
        q.join(300)
    assert [q.exitcode for q in procs] == [0, 0, 0]
    check_complete(root, kit.ref)
    assert mf.list_versions(root / "t") == ["v0001"]
    rest = [u for u in kit.units if u not in done]
    assert sorted(ledger_units(vdir, 0)[n0:]) == sorted(u for u in rest if owner(u, 3) == 0)
    for r in (1, 2):
        assert sorted(ledger_units(vdir, r)) == sorted(u for u in rest if owner(u, 3) == r)
        s = json.loads((vdir / f"summary-{r}.json").read_text())
        assert (s["rank"], s["world"], s["launcher"]) == (r, 3, "torchrun")


# ------------------------------------------------------------------------------------------------ 2. faults

def test_sigkill_at_random_moments_then_resume(kit, tmp_path):
    """Rounds of label workers (forked from this process, so no start-up cost; 1-3 ranks per round), each killed
    with SIGKILL at a seeded random moment: a random time after its start, or a random delay after it opened a
    shard (``.partial``) or appended a ledger line — so the kills land in the write path whatever the machine's
    speed. After every round the on-disk state is consistent; a resume with yet another world size gives exactly
    the uninterrupted run's samples."""
    rng = random.Random(KILL_SEED)
    root = tmp_path / "root"
    vdir = vdir_of(root)
    argv = kit.cmd(root)[1:]
    unit_s = kit.seconds_per_unit

    def happened(kind: str, rank: int, ledger0: int) -> bool:
        if kind == "time":
            return True
        if not vdir.is_dir():
            return False
        if kind == "partial":
            return any(vdir.glob(f".labels-{rank}-*.tar.partial"))
        return len(ledger_units(vdir, rank)) > ledger0

    log = []                                 # per round: world, (trigger, delay) per rank, exit codes, units done
    for _ in range(4):
        world = rng.choice([1, 2, 3])
        plan = []
        for _ in range(world):
            kind = rng.choice(["time", "partial", "ledger"])
            plan.append((kind, round(rng.uniform(0.1, 0.5 + 2 * unit_s) if kind == "time"
                                     else rng.uniform(0.0, 1.5 * unit_s), 2)))
        ledger0 = [len(ledger_units(vdir, r)) if vdir.is_dir() else 0 for r in range(world)]
        t0 = time.monotonic()
        procs = [spawn(argv, clean_env(RANK=r, WORLD_SIZE=world)) for r in range(world)]
        fired: list = [None] * world
        while any(q.is_alive() for q in procs) and time.monotonic() - t0 < 300:
            now = time.monotonic()
            for r, q in enumerate(procs):
                kind, delay = plan[r]
                if fired[r] is None and q.is_alive() and happened(kind, r, ledger0[r]):
                    fired[r] = t0 if kind == "time" else now
                if fired[r] is not None and fired[r] is not False and now >= fired[r] + delay and q.is_alive():
                    os.kill(q.pid, signal.SIGKILL)
                    fired[r] = False
            time.sleep(0.02)
        for q in procs:
            q.join(60)
        done = len(mf.read_state(vdir)["done"]) if (vdir / "version.json").is_file() else 0
        log.append((world, plan, [q.exitcode for q in procs], done))
        assert all(q.exitcode in (0, -signal.SIGKILL) for q in procs), log
        check_consistent(vdir, kit.ref)
    assert any(-signal.SIGKILL in codes for _, _, codes, _ in log), log
    for r in range(2):                       # resume: 2 ranks, one after the other (any launcher would do)
        assert cli(argv, RANK=r, WORLD_SIZE=2) == 0
    check_complete(root, kit.ref)
    assert mf.list_versions(root / "t") == ["v0001"]


def test_orphan_partial_and_lost_ledger_lines_are_recovered(kit, tmp_path):
    """A kill between a shard's rename and its index update leaves an orphan .tar; one mid-shard a .partial; one
    between the index update and the ledger line a unit without a ledger line. A rerun removes the first two,
    counts the third as done (no relabelling, no duplicate) and completes."""
    root = tmp_path / "root"
    shutil.copytree(kit.ref_root, root)
    vdir = vdir_of(root)
    (vdir / "manifest.json").unlink()
    (root / "t" / "LATEST").unlink()
    entries = mf.shard_entries(vdir)
    last = entries[-1]
    lost = {k.rsplit("_", 2)[0] for k in last["keys"]}
    lines = [ln for ln in (vdir / "ledger-0.jsonl").read_text().splitlines() if json.loads(ln)["unit"] not in lost]
    (vdir / "ledger-0.jsonl").write_text("\n".join(lines) + "\n" + '{"unit": "torn')
    orphan = vdir / f"labels-0-{len(entries):06d}.tar"
    shutil.copy(vdir / entries[0]["shard"], orphan)
    partial = vdir / f".labels-0-{len(entries) + 1:06d}.tar.partial"
    partial.write_bytes(b"half a tar")
    assert cli(kit.cmd(root)[1:]) == 0
    s = json.loads((vdir / "summary-0.json").read_text())
    assert s["units_assigned"] == 0 and (s["cleaned"]["orphans"], s["cleaned"]["partial"]) == (1, 1)
    assert not orphan.exists() and not partial.exists()
    check_complete(root, kit.ref)


# ------------------------------------------------------------------------------------------------ 3. bad inputs

def test_bad_videos_are_recorded_and_counted(kit, tmp_path, capsys):
    corpus = badinputs.write_corpus(tmp_path / "corpus")
    sources = [corpus["good_a.mp4"].parent, corpus["shard.tar"], corpus["sources.txt"], corpus["missing.mp4"],
               corpus["empty_dir"]]
    root = tmp_path / "root"
    rc = cli(kit.cmd(root, ["--set", "sampling.pairs_per_video=1"], sources=sources)[1:])
    out = capsys.readouterr()
    vdir = vdir_of(root)
    per_rank = [json.loads(ln) for ln in (vdir / "errors-0.jsonl").read_text().splitlines()]
    merged = [json.loads(ln) for ln in (vdir / "errors.jsonl").read_text().splitlines()]
    for name, why in badinputs.DECODE_BAD.items():          # unreadable videos: failed work units
        for recs in (per_rank, merged):
            hit = [r for r in recs if r["input"].endswith("/" + name)]
            assert len(hit) == 1 and why in hit[0]["reason"] and hit[0]["unit"], (name, recs)
    source_bad = ["shard.tar#bad.mp4", "missing_in_list.mp4", "missing.mp4", "empty_dir"]
    for name in source_bad:                                 # inputs that are not even videos: source errors
        for recs in (per_rank, merged):
            hit = [r for r in recs if r["input"].endswith(name)]
            assert len(hit) == 1 and hit[0]["reason"] and hit[0].get("stage") == "sources", (name, recs)
    n_bad = len(badinputs.DECODE_BAD) + len(source_bad)
    assert len(per_rank) == len(merged) == n_bad
    assert rc == FAILED_EXIT_BASE + n_bad, out.err
    assert f"{len(badinputs.DECODE_BAD)} failed" in out.out and f"+{len(source_bad)} bad inputs" in out.out
    man, got = check_complete(root, None)
    # good: good_a, good_b (also listed by sources.txt and pipe:cat: same bytes, same unit), 000.mp4, 002.mp4
    assert man["units"] == {"total": 4 + len(badinputs.DECODE_BAD), "done": 4, "failed": len(badinputs.DECODE_BAD)}
    assert len(got) == 4


# ------------------------------------------------------------------------------------------------ 4. output errors

def test_unwritable_output_directory_is_a_clear_error(kit, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    root = blocker / "labels"
    assert cli(kit.cmd(root)[1:]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(root) in err, err
    assert blocker.read_text() == "not a directory"


@contextlib.contextmanager
def tmpfs(path: Path, opts: str):
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        gc.collect()                        # drop file objects a failed writer may still hold
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_read_only_output_directory(kit, tmp_path, capsys):
    with tmpfs(tmp_path / "ro", "size=1m,ro") as mnt:
        assert cli(kit.cmd(mnt / "labels")[1:]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and str(mnt / "labels") in err and "Read-only" in err, err


def test_disk_full_tmpfs(kit, tmp_path, capsys):
    """A real full filesystem: the first shard does not fit. Exit 2 naming the version directory; no shard, no
    temporary, no index and no ledger line left behind."""
    with tmpfs(tmp_path / "full", "size=24k") as mnt:
        root = mnt / "labels"
        assert cli(kit.cmd(root)[1:]) == 2
        err = capsys.readouterr().err
        vdir = vdir_of(root)
        assert "Traceback" not in err and str(vdir) in err and "No space left" in err, err
        assert sorted(p.name for p in vdir.iterdir()) == ["version.json"]
        assert not (root / "t" / "LATEST").exists()


@pytest.mark.parametrize("where", ["shard", "index", "ledger"])
def test_disk_full_midway_publishes_only_complete_shards(kit, tmp_path, capsys, monkeypatch, where):
    """ENOSPC injected while the second shard is published — into its data (``shard``), into the index update
    after its rename (``index``), or into its ledger line (``ledger``): exit 2 naming the version directory; the
    first shard stays published with its ledger lines; a shard without an index entry is not left visible; no
    ledger line names a sample that was not published. A resume then completes (``shard`` case)."""
    from pipeline import shards

    def enospc(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    calls = []

    def failing_on_second(real):
        def f(*a, **k):
            calls.append(1)
            return enospc() if len(calls) >= 2 else real(*a, **k)
        return f

    if where == "shard":
        real_init, real_write = shards._HashingFile.__init__, shards._HashingFile.write

        def init(self, path):
            real_init(self, path)
            calls.append(path)

        monkeypatch.setattr(shards._HashingFile, "__init__", init)
        monkeypatch.setattr(shards._HashingFile, "write",
                            lambda self, data: enospc() if len(calls) >= 2 and self.nbytes > 1024
                            else real_write(self, data))
    elif where == "index":
        monkeypatch.setattr(shards, "write_index", failing_on_second(shards.write_index))
    else:
        monkeypatch.setattr(mf, "append_jsonl", failing_on_second(mf.append_jsonl))
    root = tmp_path / "root"
    vdir = vdir_of(root)
    assert cli(kit.cmd(root)[1:]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(vdir) in err and "No space left" in err, err
    monkeypatch.undo()
    published = ["labels-0-000000.tar"] + (["labels-0-000001.tar"] if where == "ledger" else [])
    assert sorted(p.name for p in vdir.glob("*.tar")) == published
    assert [e["shard"] for e in mf.shard_entries(vdir)] == published
    assert not [p.name for p in vdir.iterdir() if p.name.endswith(".partial")]
    got = check_consistent(vdir, kit.ref)
    first = {k.rsplit("_", 2)[0] for k in mf.shard_entries(vdir)[0]["keys"]}
    assert sorted(ledger_units(vdir)) == sorted(first) and len(first) == 2
    assert len(got) == 4 * len(published)
    assert not (root / "t" / "LATEST").exists()
    if where == "shard":
        assert cli(kit.cmd(root)[1:]) == 0
        check_complete(root, kit.ref)


# ------------------------------------------------------------------------------------------------ 5. refresh

def test_refresh(kit, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for p in sorted(kit.vids.glob("*.mp4")):
        shutil.copy(p, src / p.name)
    root = tmp_path / "root"
    shutil.copytree(kit.ref_root, root)
    sdir = root / "t"
    argv = ["refresh"] + kit.cmd(root, sources=[src])[2:]

    def refresh(*extra):
        rc = cli(argv + list(extra))
        out = capsys.readouterr()
        assert rc == 0, out.err
        return out.out, [m.group(1) for m in map(UNIT_LINE.match, out.out.splitlines()) if m]

    def add(n, seed):
        paths = [badinputs.make_good_video(src / f"new{seed + i}.mp4", n_frames=8, seed=seed + i) for i in range(n)]
        return [it.id for it in iter_videos(paths)]

    out, planned = refresh("--dry-run")                       # same videos (copied: ids are content hashes)
    assert planned == [] and "to label: 0" in out
    new3 = add(3, 300)
    before = tree_hash(sdir)
    out, planned = refresh("--dry-run")
    assert sorted(planned) == sorted(new3) and "version v0001" in out
    out, planned = refresh("--dry-run", "--set", "tracer.num_masks=2")
    assert "version (new)" in out and "tracer changed since v0001" in out
    assert sorted(planned) == sorted(kit.units + new3)
    assert tree_hash(sdir) == before and mf.list_versions(sdir) == ["v0001"], "a dry run changed the label set"

    out, planned = refresh()                                  # real refresh: only the new videos, same version
    assert sorted(planned) == sorted(new3)
    v1 = sdir / "v0001"
    assert sorted(ledger_units(v1)) == sorted(kit.units + new3)
    assert mf.list_versions(sdir) == ["v0001"]
    man1, c1 = check_complete(root, None)
    assert man1["units"] == {"total": 9, "done": 9, "failed": 0} and sorted(man1["unit_ids"]) == sorted(kit.units + new3)
    assert {k: c1[k] for k in kit.ref} == kit.ref and len(c1) == 2 * 9

    new1 = add(1, 400)                                        # --keep-old on a tracer change: new version
    v1_files = tree_hash(v1)
    out, planned = refresh("--keep-old", "--set", "tracer.num_masks=2")
    assert planned == new1 and "keeping v0001's labels" in out
    assert mf.list_versions(sdir) == ["v0001", "v0002"]
    v2 = sdir / "v0002"
    assert mf.read_version(v2)["base"] == "v0001"
    assert ledger_units(v2) == new1
    man2, c2 = check_complete(root, None, version="v0002")
    assert man2["units"] == {"total": 10, "done": 10, "failed": 0} and man2["base"] == "v0001"
    old = [f"../v0001/{e['shard']}" for e in man1["shards"]]
    assert [e["shard"] for e in man2["shards"]][:len(old)] == old
    assert all("/" not in e["shard"] for e in man2["shards"][len(old):])
    assert {k: c2[k] for k in c1} == c1 and len(c2) == len(c1) + 2
    assert tree_hash(v1) == v1_files, "--keep-old modified the old version"
    assert mf.read_manifest(v1)["units"]["total"] == 9


# ------------------------------------------------------------------------------------------------ 6. dist

def test_resolve_rank_torchrun():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "GROUP_RANK": "2",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}            # torchrun under srun: torchrun's variables win
    assert resolve_rank(env) == RankInfo(5, 8, 1, 2, "torchrun")
    assert resolve_rank({"RANK": "1", "WORLD_SIZE": "2", "NODE_RANK": "1"}) == RankInfo(1, 2, 0, 1, "torchrun")
    assert resolve_rank({"RANK": "0", "WORLD_SIZE": "1"}).launcher == "torchrun"


def test_resolve_rank_slurm_array():
    assert resolve_rank({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4",
                         "SLURM_ARRAY_TASK_MIN": "0"}) == RankInfo(2, 4, 0, 0, "slurm-array")
    # --array=1-4: ids 1..4 -> ranks 0..3 of 4
    got = [resolve_rank({"SLURM_ARRAY_TASK_ID": str(t), "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1",
                         "SLURM_ARRAY_TASK_MAX": "4"}) for t in range(1, 5)]
    assert [(i.rank, i.world) for i in got] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    # --array=10-16:3: ids 10, 13, 16
    got = [resolve_rank({"SLURM_ARRAY_TASK_ID": str(t), "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "10",
                         "SLURM_ARRAY_TASK_STEP": "3"}).rank for t in (10, 13, 16)]
    assert got == [0, 1, 2]
    # srun -n 2 inside each task of --array=1-3: 6 ranks, each exactly once
    got = [resolve_rank({"SLURM_ARRAY_TASK_ID": str(t), "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1",
                         "SLURM_NTASKS": "2", "SLURM_PROCID": str(p), "SLURM_LOCALID": str(p), "SLURM_NODEID": "0"})
           for t in (1, 2, 3) for p in (0, 1)]
    assert sorted(i.rank for i in got) == list(range(6)) and {i.world for i in got} == {6}
    assert {i.launcher for i in got} == {"slurm-array"} and got[1].local_rank == 1


def test_resolve_rank_slurm_tasks_and_default():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_JOB_ID": "7"}
    assert resolve_rank(env) == RankInfo(3, 4, 1, 1, "slurm")
    assert resolve_rank({}) == RankInfo(0, 1, 0, 0, "single")
    assert resolve_rank({"PATH": "/bin", "SLURM_JOB_ID": "7"}) == RankInfo()     # inside a job, not a task
    with environ(RANK=1, WORLD_SIZE=3):
        assert resolve_rank() == RankInfo(1, 3, 0, 0, "torchrun")                # default: os.environ


@pytest.mark.parametrize("env,var", [
    ({"RANK": "one", "WORLD_SIZE": "2"}, "$RANK"),
    ({"RANK": "0", "WORLD_SIZE": "2.5"}, "$WORLD_SIZE"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "x"}, "$LOCAL_RANK"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE"),
    ({"SLURM_ARRAY_TASK_ID": "3"}, "$SLURM_ARRAY_TASK_COUNT"),
    ({"SLURM_ARRAY_TASK_ID": "a", "SLURM_ARRAY_TASK_COUNT": "4"}, "$SLURM_ARRAY_TASK_ID"),
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}, "SLURM_ARRAY_TASK_ID"),
    ({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}, "SLURM_ARRAY_TASK_ID"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "many"}, "$SLURM_NTASKS"),
    ({"SLURM_PROCID": "4", "SLURM_NTASKS": "4"}, "SLURM_PROCID"),
])
def test_resolve_rank_bad_values_name_the_variable(env, var):
    with pytest.raises(InputError) as e:
        resolve_rank(env)
    assert var in str(e.value)


def test_owner_is_stable_and_balanced():
    # golden values: sha256-based, independent of Python's hash seed, machine and world history
    assert unit_hash("abc") == int.from_bytes(hashlib.sha256(b"abc").digest()[:8], "big")
    assert [owner("7c6f552e53786d31", w) for w in (1, 2, 3, 7, 16)] == \
           [0] + [int.from_bytes(hashlib.sha256(b"7c6f552e53786d31").digest()[:8], "big") % w for w in (2, 3, 7, 16)]
    r = subprocess.run([sys.executable, "-c", "from pipeline.dist import owner; print(owner('7c6f552e53786d31', 7))"],
                       env=clean_env(PYTHONHASHSEED=12345), capture_output=True, text=True, cwd=REPO)
    assert r.stdout.strip() == str(owner("7c6f552e53786d31", 7)), r.stderr
    ids = [hashlib.sha256(f"video-{i}".encode()).hexdigest()[:16] for i in range(6000)]
    for world in (2, 3, 5, 8, 16):
        counts = [0] * world
        for u in ids:
            counts[owner(u, world)] += 1
        mean = len(ids) / world
        assert max(abs(c - mean) for c in counts) < 0.2 * mean, (world, counts)
        assert sum(is_mine(u, RankInfo(0, world)) for u in ids) == counts[0]
    with pytest.raises(ValueError):
        owner("abc", 0)


def test_default_yaml_equals_builtin_defaults():
    from pipeline.config import load_config
    from pipeline.label import DEFAULTS

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs/label/default.yaml"), [], DEFAULTS)
    assert cfg == DEFAULTS
