"""Video sources: spec kinds, content ids, laziness, tar shards, list files and bad inputs."""
from __future__ import annotations

import gc
import gzip
import itertools
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import badinputs  # noqa: E402

from pipeline import sources  # noqa: E402
from pipeline.common import ErrorLog, InputError  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return badinputs.write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def vids(tmp_path_factory):
    """Three small good videos with distinct bytes."""
    d = tmp_path_factory.mktemp("vids")
    return [badinputs.make_good_video(d / f"v{i}.mp4", n_frames=8, seed=20 + i) for i in range(3)]


def _ids(specs, **kw):
    return [(it.uri, it.id) for it in sources.iter_videos(specs, **kw)]


def test_file_id_is_content_derived_and_stable(vids, tmp_path):
    item = next(sources.iter_videos(str(vids[0])))
    assert len(item.id) == 16 and all(c in "0123456789abcdef" for c in item.id) and "." not in item.id
    assert item.uri == str(vids[0]) and item.name == "v0.mp4" and item.shots is None
    assert item.size == vids[0].stat().st_size
    assert item.open().read() == vids[0].read_bytes()
    # Same bytes elsewhere under another name → same id; one byte changed → another id.
    copy = tmp_path / "sub" / "renamed.mp4"
    copy.parent.mkdir()
    shutil.copy(vids[0], copy)
    assert next(sources.iter_videos(str(copy))).id == item.id
    data = bytearray(vids[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    changed = tmp_path / "changed.mp4"
    changed.write_bytes(bytes(data))
    assert next(sources.iter_videos(str(changed))).id != item.id
    # Distinct videos → distinct ids; repeated iteration → same ids.
    assert len({i for _, i in _ids([str(v) for v in vids])}) == 3
    assert _ids([str(v) for v in vids]) == _ids([str(v) for v in vids])


def test_id_of_large_file_reads_only_the_edges(tmp_path):
    """A 40 MiB file: the id depends on size and both ends, and hashing reads at most 2 MiB."""
    big = tmp_path / "big.mp4"
    with open(big, "wb") as f:
        f.write(b"head" * 1000)
        f.seek(40 << 20)
        f.write(b"tail")
    base = sources.file_id(big)

    class Counting:
        def __init__(self, f):
            self.f, self.n = f, 0

        def read(self, n=-1):
            b = self.f.read(n)
            self.n += len(b)
            return b

        def seek(self, *a):
            return self.f.seek(*a)

    with open(big, "rb") as f:
        c = Counting(f)
        assert sources.content_id(c, big.stat().st_size) == base
        assert c.n <= 2 * sources.ID_EDGE_BYTES
    with open(big, "r+b") as f:                 # a byte in the middle is not part of the id ...
        f.seek(20 << 20)
        f.write(b"x")
    assert sources.file_id(big) == base
    with open(big, "r+b") as f:                 # ... the last bytes are
        f.seek(-1, os.SEEK_END)
        f.write(b"X")
    assert sources.file_id(big) != base


def test_same_bytes_same_id_across_source_kinds(vids, tmp_path):
    data = vids[1].read_bytes()
    want = sources.file_id(vids[1])
    shard = badinputs.write_tar(tmp_path / "s.tar", {"a/clip.mp4": data, "a/clip.json": b"{}"})
    (tmp_path / "s.tar.gz").write_bytes(gzip.compress(shard.read_bytes(), mtime=0))
    got = {
        "tar": next(sources.iter_videos(str(shard))),
        "tgz": next(sources.iter_videos(str(tmp_path / "s.tar.gz"))),
        "pipe": next(sources.iter_videos(f"pipe:cat {vids[1]}")),
        "url": next(sources.iter_videos(vids[1].resolve().as_uri())),
        "pipe_tar": next(sources.iter_videos(f"pipe:cat {shard}")),
    }
    for kind, item in got.items():
        assert item.id == want, kind
        with item.open() as f:
            assert f.read() == data, kind
    assert got["tar"].uri == f"{shard}#a/clip.mp4" and got["tar"].name == "a/clip.mp4"
    assert got["tar"].path is None                           # a window into the shard, not a copy
    assert got["pipe_tar"].uri == f"pipe:cat {shard}#a/clip.mp4"
    # Streamed bytes live in a spool file that disappears with the item.
    spool = got["pipe"].path
    assert spool.is_file() and spool.read_bytes() == data
    del got
    gc.collect()
    assert not spool.exists()


def test_directory_is_recursive_sorted_and_filtered(vids, tmp_path):
    root = tmp_path / "root"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a").mkdir()
    (root / ".hidden").mkdir()
    shutil.copy(vids[0], root / "b" / "deep" / "z.mp4")
    shutil.copy(vids[1], root / "a" / "y.MP4")
    shutil.copy(vids[2], root / "x.mkv")
    shutil.copy(vids[2], root / ".hidden" / "h.mp4")
    (root / "notes.txt").write_text("not a video")
    (root / "a" / "img.jpg").write_bytes(b"\xff\xd8")
    uris = [u for u, _ in _ids(str(root))]
    assert uris == [str(root / "x.mkv"), str(root / "a" / "y.MP4"), str(root / "b" / "deep" / "z.mp4")]
    assert list(sources.list_videos(str(root))) == uris


def test_globs(vids, tmp_path):
    for i, v in enumerate(vids):
        d = tmp_path / f"d{i}"
        d.mkdir()
        shutil.copy(v, d / f"c{i}.mp4")
    assert [u for u, _ in _ids(str(tmp_path / "d*" / "c*.mp4"))] == \
        [str(tmp_path / f"d{i}" / f"c{i}.mp4") for i in range(3)]
    assert len(_ids(str(tmp_path / "**" / "*.mp4"))) == 3
    with pytest.raises(InputError) as e:
        list(sources.iter_videos(str(tmp_path / "nothing*" / "*.webm")))
    assert "nothing*" in str(e.value) and "glob matched no video" in str(e.value)


def test_list_file_relative_pipe_url_and_comments(vids, tmp_path, monkeypatch):
    lst_dir = tmp_path / "lists"
    lst_dir.mkdir()
    shutil.copy(vids[0], lst_dir / "rel.mp4")
    lst = badinputs.write_url_list(lst_dir / "videos.txt", [
        "rel.mp4",                                   # relative to the list file
        "  pipe:cat rel.mp4  ",                      # runs in the list's folder (same bytes: deduped)
        f"pipe:cat {vids[1]}",
        vids[2].resolve().as_uri(),
    ])
    text = lst.read_text()
    assert "\n\n" in text and "# a comment line" in text and "\n   \n" in text
    monkeypatch.chdir(tmp_path)                  # resolution must not depend on the cwd
    items = list(sources.iter_videos(str(lst)))
    assert [it.uri for it in items] == [str(lst_dir / "rel.mp4"), f"pipe:cat {vids[1]}", vids[2].resolve().as_uri()]
    assert [it.id for it in items] == [sources.file_id(v) for v in vids]
    # Without de-duplication the pipe entry with the same bytes is its own item (same id).
    items = list(sources.iter_videos(str(lst), dedupe=False))
    assert items[1].uri == "pipe:cat rel.mp4" and items[1].id == items[0].id
    assert len(list(sources.list_videos(str(lst)))) == 4


def test_list_file_errors_name_entry_and_line(vids, tmp_path):
    lst = badinputs.write_url_list(tmp_path / "l.list", [str(vids[0]), "gone.mp4", "pipe:exit 3", str(vids[1])])
    with pytest.raises(InputError) as e:
        list(sources.iter_videos(str(lst)))
    assert str(tmp_path / "gone.mp4") in str(e.value) and f"listed at {lst}:" in str(e.value)
    log = ErrorLog(tmp_path / "errors.jsonl")
    items = list(sources.iter_videos(str(lst), errors=log))
    assert [it.uri for it in items] == [str(vids[0]), str(vids[1])]
    recs = [json.loads(line) for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert recs[0]["input"] == str(tmp_path / "gone.mp4") and "no such file" in recs[0]["reason"]
    assert recs[1]["input"] == "pipe:exit 3" and "exited with status 3" in recs[1]["reason"]
    only_comments = tmp_path / "c.txt"
    only_comments.write_text("# nothing\n\n   \n")
    with pytest.raises(InputError, match="no entries"):
        list(sources.iter_videos(str(only_comments)))


def test_ten_thousand_entry_list_is_lazy(vids, tmp_path, monkeypatch):
    lst = tmp_path / "many.txt"
    lines = [str(vids[0])] + [str(tmp_path / "absent" / f"{i:05d}.mp4") for i in range(1, 10000)]
    lst.write_text("\n".join(lines) + "\n")
    calls = []
    real = sources.content_id
    monkeypatch.setattr(sources, "content_id", lambda *a, **k: calls.append(1) or real(*a, **k))
    seen = []
    real_stat = Path.stat
    monkeypatch.setattr(Path, "stat", lambda self, **k: seen.append(str(self)) or real_stat(self, **k))
    first = next(sources.iter_videos(str(lst)))
    assert first.uri == str(vids[0]) and len(calls) == 1
    assert not any("absent" in s for s in seen)          # no later entry was even looked at
    # A full run records every missing entry and still finishes.
    log = ErrorLog(None)
    items = list(sources.iter_videos(str(lst), errors=log))
    assert len(items) == 1 and log.count == 9999 and len(calls) == 2
    assert log.records[-1]["input"] == str(tmp_path / "absent" / "09999.mp4")


def test_tar_shard_members_and_corrupt_header(corpus, tmp_path):
    shard = corpus["shard.tar"]
    with pytest.raises(InputError) as e:
        list(sources.iter_videos(str(shard)))
    assert str(e.value).startswith(f"{shard}#bad.mp4:") and "corrupt tar member header" in str(e.value)
    log = ErrorLog(tmp_path / "errors.jsonl")
    items = list(sources.iter_videos(str(shard), errors=log))
    assert [it.uri for it in items] == [f"{shard}#000.mp4", f"{shard}#002.mp4"]   # the rest still comes
    assert log.count == 1 and log.records[0]["input"] == f"{shard}#bad.mp4"
    # Streaming the same shard through a pipe gives the same items and the same error.
    log2 = ErrorLog(None)
    streamed = list(sources.iter_videos(f"pipe:cat {shard}", errors=log2))
    assert [it.id for it in streamed] == [it.id for it in items] and log2.count == 1


def test_truncated_tar_member(vids, tmp_path):
    shard = badinputs.write_tar(tmp_path / "t.tar", {"a.mp4": vids[0].read_bytes(), "b.mp4": vids[1].read_bytes()})
    data = shard.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: 512 + len(vids[0].read_bytes()) + 512 + 700])   # b.mp4 loses most of its data
    log = ErrorLog(None)
    items = list(sources.iter_videos(str(cut), errors=log))
    assert [it.name for it in items] == ["a.mp4"]
    assert log.records[0]["input"] == f"{cut}#b.mp4" and "truncated tar member" in log.records[0]["reason"]
    log = ErrorLog(None)
    assert [it.name for it in sources.iter_videos(f"pipe:cat {cut}", errors=log)] == ["a.mp4"]
    assert "truncated tar member" in log.records[0]["reason"]


def test_missing_path_empty_dir_and_unsupported(corpus, tmp_path):
    with pytest.raises(InputError) as e:
        list(sources.iter_videos(str(corpus["missing.mp4"])))
    assert e.value.input == str(corpus["missing.mp4"]) and e.value.reason == "no such file or directory"
    with pytest.raises(InputError) as e:
        list(sources.iter_videos(str(corpus["empty_dir"])))
    assert e.value.input == str(corpus["empty_dir"]) and "no video files" in e.value.reason
    (tmp_path / "pic.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(InputError, match="unsupported file type"):
        list(sources.iter_videos(str(tmp_path / "pic.jpg")))
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(InputError, match="empty file"):
        list(sources.iter_videos(str(tmp_path / "empty.mp4")))
    with pytest.raises(InputError, match="unknown clip"):
        list(sources.iter_videos("clips:nope"))
    with pytest.raises(InputError, match="unsupported URL scheme"):
        list(sources.iter_videos("s3://bucket/x.mp4"))


def test_many_inputs_record_failures_and_finish(corpus, tmp_path):
    specs = [str(corpus["missing.mp4"]), str(corpus["empty_dir"]), str(corpus["shard.tar"]),
             str(corpus["sources.txt"]), str(corpus["good_a.mp4"].parent)]
    log_path = tmp_path / "errors.jsonl"
    items = list(sources.iter_videos(specs, errors=ErrorLog(log_path)))
    recs = [json.loads(line) for line in log_path.read_text().splitlines()]
    inputs = [r["input"] for r in recs]
    assert inputs == [str(corpus["missing.mp4"]), str(corpus["empty_dir"]), f"{corpus['shard.tar']}#bad.mp4",
                      str(corpus["sources.txt"].parent / "videos" / "missing_in_list.mp4")]
    uris = [it.uri for it in items]
    assert uris[:2] == [f"{corpus['shard.tar']}#000.mp4", f"{corpus['shard.tar']}#002.mp4"]
    assert str(corpus["good_a.mp4"]) in uris and str(corpus["not_video.mp4"]) in uris   # decode rejects it
    assert len(set(it.id for it in items)) == len(items)


def test_iteration_order_and_listing_are_deterministic(corpus):
    specs = [str(corpus["shard.tar"]), str(corpus["good_a.mp4"].parent)]
    a = list(itertools.islice(sources.iter_videos(specs, errors=ErrorLog(None)), 20))
    b = list(itertools.islice(sources.iter_videos(specs, errors=ErrorLog(None)), 20))
    assert [(x.uri, x.id) for x in a] == [(x.uri, x.id) for x in b]
    assert list(sources.list_videos(specs, errors=ErrorLog(None))) == [x.uri for x in a]


def test_brace_notation_for_shards(vids, tmp_path):
    for i, v in enumerate(vids):
        badinputs.write_tar(tmp_path / f"shard-{i:03d}.tar", {f"{i}.mp4": v.read_bytes()})
    want = [sources.file_id(v) for v in vids]
    assert [it.id for it in sources.iter_videos(str(tmp_path / "shard-{000..002}.tar"))] == want
    assert [it.id for it in sources.iter_videos(f"pipe:cat {tmp_path}/shard-{{000..002}}.tar")] == want
    assert list(sources.list_videos(str(tmp_path / "shard-{000,002}.tar"))) == \
        [f"{tmp_path}/shard-000.tar#0.mp4", f"{tmp_path}/shard-002.tar#2.mp4"]
    assert list(sources.list_videos("clips:bikes,realshort")) == ["clips:bikes", "clips:realshort"]
