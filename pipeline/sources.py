"""Video sources: turn user specs into a lazy, deterministic stream of work units (:class:`VideoItem`).

Spec kinds (``iter_videos`` takes one spec or a list):

- a video file (``.mp4 .m4v .mov .mkv .webm .avi .y4m``);
- a directory: every video file below it, recursively, in sorted order (hidden entries skipped);
- a glob (``*``, ``?``, ``[...]``, ``**`` recursive): matching video files and tar shards, sorted;
- a list file (``.txt`` / ``.list``): one entry per line; blank lines and lines starting with ``#`` are
  skipped; each entry is itself a spec (path, glob, directory, tar, URL, ``pipe:`` command or
  ``clips:``); relative paths are relative to the list file, and ``pipe:`` commands run in its folder;
- a webdataset tar shard (``.tar``, ``.tar.gz``, ``.tgz``): every member with a video extension is an
  item, with uri ``shard.tar#member``; a corrupt member header is reported and skipped;
- a URL (``http://``, ``https://``, ``file://``) or ``pipe:<shell command writing bytes to stdout>``
  (webdataset's form), each either one video or a tar stream (told apart by the tar magic);
  webdataset's brace notation (``shard-{000..009}.tar``, ``{a,b}``) is expanded in any spec that is
  not an existing path;
- ``clips:`` / ``clips:bikes,realshort``: the verified demo clips (``pipeline.clips``), with shots.

Ids. ``VideoItem.id`` is 16 lowercase hex characters: sha256 over a version tag, the byte size and
the first and last ``ID_EDGE_BYTES`` bytes of the video (the whole video when it is at most twice
that). The same bytes get the same id whatever the source kind (file, tar member, pipe, URL) and on
any machine. For a local file (or a member of a local uncompressed tar) only those edge bytes are read;
stream entries (pipe, URL, members of streamed or compressed tars) are spooled to a temporary file
(removed when the item is garbage-collected) while they are read.

Laziness. Specs, list lines, directory levels and tar headers are read as iteration proceeds; an id is
computed only when its item is about to be yielded. Nothing is decoded here (``pipeline.decode`` does
that and rejects non-video bytes).

Errors. With ``errors=None`` the first bad input raises :class:`InputError` naming it; with an
:class:`ErrorLog`, each bad input is recorded and iteration goes on.
"""
from __future__ import annotations

import glob as _glob
import hashlib
import io
import logging
import os
import re
import shlex
import subprocess
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

from .common import ErrorLog, InputError

log = logging.getLogger(__name__)

VIDEO_EXTS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".y4m")
TAR_EXTS = (".tar", ".tar.gz", ".tgz")
LIST_EXTS = (".txt", ".list")
URL_SCHEMES = ("http://", "https://", "file://")
ID_EDGE_BYTES = 1 << 20          # bytes hashed from each end of a video for its id
ID_TAG = b"flowdistill.video-id.v1\0"
MAX_STREAM_BYTES = 16 << 30      # refuse to spool a single streamed video larger than this
MAX_LIST_DEPTH = 8               # list files may name list files, this deep at most
_CHUNK = 1 << 20


def _lower_ext(name: str, exts: tuple[str, ...]) -> bool:
    return name.lower().endswith(exts)


def is_video_name(name: str) -> bool:
    """True if ``name`` has a video extension."""
    return _lower_ext(name, VIDEO_EXTS)


# ---------------------------------------------------------------------------------------------- items
class _Spool:
    """A temporary file holding streamed bytes; deleted when this object is garbage-collected."""

    def __init__(self, suffix: str):
        tmpdir = os.environ.get("FLOWDISTILL_TMP") or None
        if tmpdir:
            os.makedirs(tmpdir, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="flowdistill-spool-", suffix=suffix, dir=tmpdir)
        os.close(fd)
        self.path = Path(path)
        self._finalizer = weakref.finalize(self, _unlink_quietly, path)

    def delete(self) -> None:
        self._finalizer()


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _Window(io.RawIOBase):
    """Read-only, seekable view of ``size`` bytes at ``offset`` in a file (a member of a local tar)."""

    def __init__(self, path: str | os.PathLike, offset: int, size: int):
        super().__init__()
        self._f = open(path, "rb")
        self._offset, self._size, self._pos = offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            new = pos
        elif whence == io.SEEK_CUR:
            new = self._pos + pos
        elif whence == io.SEEK_END:
            new = self._size + pos
        else:
            raise ValueError(f"bad whence {whence}")
        if new < 0:
            raise ValueError("negative seek position")
        self._pos = new
        return new

    def readinto(self, buf) -> int:
        n = max(0, min(len(buf), self._size - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._offset + self._pos)
        data = self._f.read(n)
        buf[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


@dataclass
class VideoItem:
    """One work unit: one video.

    ``id``: 16 lowercase hex chars, content-derived (see module docstring). ``uri``: where it came from
    (path, ``shard.tar#member``, URL, ``pipe:...``, ``clips:name``). ``name``: short human name (file or
    member name). ``shots``: frame ranges ``[start, end)`` with no cut inside, or None (one shot).
    ``path``: a local file holding exactly the video's bytes (the file itself, a cache file or a spool
    file), or None for a member of a local tar (read through ``open()``). ``size``: bytes.
    """

    id: str
    uri: str
    name: str
    shots: list[tuple[int, int]] | None = None
    path: Path | None = None
    size: int = 0
    _opener: Callable[[], BinaryIO] | None = field(default=None, repr=False, compare=False)
    _keep: object = field(default=None, repr=False, compare=False)     # keeps a spool file alive

    def open(self) -> BinaryIO:
        """A new binary, seekable file object over the video's bytes (caller closes it)."""
        if self._opener is not None:
            return self._opener()
        return open(self.path, "rb")


def content_id(f: BinaryIO, size: int, where: str = "") -> str:
    """The 16-hex-char id of ``size`` bytes readable from seekable ``f`` (see module docstring)."""
    h = hashlib.sha256(ID_TAG)
    h.update(int(size).to_bytes(8, "little"))
    head_n = min(size, ID_EDGE_BYTES)
    f.seek(0)
    head = _read_n(f, head_n)
    tail_start = max(ID_EDGE_BYTES, size - ID_EDGE_BYTES)
    tail = b""
    if size > tail_start:
        f.seek(tail_start)
        tail = _read_n(f, size - tail_start)
    if len(head) != head_n or len(tail) != max(0, size - tail_start):
        raise InputError(where, f"file is shorter than its stated size {size} (changed while reading?)")
    h.update(head)
    h.update(tail)
    return h.hexdigest()[:16]


def _read_n(f: BinaryIO, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        block = f.read(min(_CHUNK, n - got))
        if not block:
            break
        parts.append(block)
        got += len(block)
    return b"".join(parts)


def file_id(path: str | os.PathLike) -> str:
    """Content id of a local file (reads at most 2 * ID_EDGE_BYTES bytes)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        return content_id(f, size, str(path))


# ---------------------------------------------------------------------------------------------- entries
@dataclass
class _Entry:
    """A video found by expansion, not yet hashed. ``make`` builds the VideoItem (reads bytes)."""

    uri: str
    make: Callable[[], VideoItem] | None


class _Ctx:
    """Error policy for one iteration: raise at once, or record and go on."""

    def __init__(self, errors: ErrorLog | None):
        self.errors = errors

    def fail(self, input: str, reason: str) -> None:
        if self.errors is None:
            raise InputError(input, reason)
        log.warning("%s: %s", input, reason)
        self.errors.record(input, reason)


def _local_item(path: Path, uri: str, name: str, shots=None) -> VideoItem:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InputError(uri, "no such file or directory") from None
    except OSError as e:
        raise InputError(uri, f"cannot read: {e.strerror or e}") from None
    if size == 0:
        raise InputError(uri, "empty file (0 bytes)")
    try:
        with open(path, "rb") as f:
            vid = content_id(f, size, uri)
    except OSError as e:
        raise InputError(uri, f"cannot read: {e.strerror or e}") from None
    return VideoItem(id=vid, uri=uri, name=name, shots=list(shots) if shots else None, path=path, size=size)


def _window_item(tar_path: Path, offset: int, size: int, uri: str, name: str) -> VideoItem:
    if size == 0:
        raise InputError(uri, "empty tar member (0 bytes)")
    with _Window(tar_path, offset, size) as w:
        vid = content_id(w, size, uri)
    return VideoItem(id=vid, uri=uri, name=name, size=size,
                     _opener=lambda: io.BufferedReader(_Window(tar_path, offset, size), buffer_size=1 << 16))


def _spool_item(chunks: Iterable[bytes], uri: str, name: str) -> VideoItem:
    """Write streamed bytes to a spool file, then hash it like a local file."""
    suffix = Path(name).suffix if is_video_name(name) else ".bin"
    spool = _Spool(suffix)
    size = 0
    try:
        with open(spool.path, "wb") as out:
            for block in chunks:
                size += len(block)
                if size > MAX_STREAM_BYTES:
                    raise InputError(uri, f"stream is larger than the {MAX_STREAM_BYTES} byte limit")
                out.write(block)
        if size == 0:
            raise InputError(uri, "empty stream (0 bytes)")
        with open(spool.path, "rb") as f:
            vid = content_id(f, size, uri)
    except BaseException:
        spool.delete()
        raise
    return VideoItem(id=vid, uri=uri, name=name, path=spool.path, size=size, _keep=spool)


# ---------------------------------------------------------------------------------------------- tar
_TAR_BLOCK = 512


def _octal(field_: bytes) -> int:
    """A tar numeric field: octal text, or base-256 when the high bit is set (GNU)."""
    if field_ and field_[0] & 0x80:
        value = field_[0] & 0x7F
        for b in field_[1:]:
            value = (value << 8) | b
        return value
    text = field_.split(b"\0", 1)[0].strip(b" \0")
    if not text:
        return 0
    return int(text, 8)


def _tar_header(block: bytes) -> dict:
    """Parse one 512-byte ustar/gnu header; raises ValueError when its checksum is wrong."""
    stored = _octal(block[148:156])
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    signed = unsigned - 2 * sum(b for b in block[:148] + block[156:] if b > 127)
    name_guess = block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    if stored not in (unsigned, signed):
        raise ValueError("bad header checksum", name_guess)
    name = name_guess
    if block[257:262] == b"ustar":
        prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
        if prefix and block[257:263] == b"ustar\0":
            name = prefix + "/" + name
    return {"name": name, "size": _octal(block[124:136]), "type": block[156:157]}


def _pax_records(data: bytes) -> dict:
    out, pos = {}, 0
    while pos < len(data):
        m = re.match(rb"(\d+) ", data[pos:pos + 32])
        if not m:
            break
        length = int(m.group(1))
        rec = data[pos + len(m.group(0)):pos + length - 1]
        key, _, value = rec.partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out


class _BlockReader:
    """Sequential 512-byte-block reader over a binary stream (seeking forward when it can)."""

    def __init__(self, f: BinaryIO, seekable: bool, size: int | None):
        self.f, self.seekable, self.size, self.pos = f, seekable, size, 0

    def read(self, n: int) -> bytes:
        data = _read_n(self.f, n)
        self.pos += len(data)
        return data

    def skip(self, n: int) -> int:
        """Skip ``n`` bytes; returns how many could be skipped (fewer at end of data)."""
        if self.seekable:
            n_ok = n if self.size is None else max(0, min(n, self.size - self.pos))
            self.f.seek(self.pos + n_ok)
            self.pos += n_ok
            return n_ok
        got = 0
        while got < n:
            block = self.f.read(min(_CHUNK, n - got))
            if not block:
                break
            got += len(block)
        self.pos += got
        return got

    def chunks(self, n: int) -> Iterator[bytes]:
        left = n
        while left > 0:
            block = self.f.read(min(_CHUNK, left))
            if not block:
                return
            self.pos += len(block)
            left -= len(block)
            yield block


def _iter_tar(f: BinaryIO, where: str, ctx: _Ctx, *, tar_path: Path | None, size: int | None,
              materialize: bool) -> Iterator[_Entry]:
    """Yield video members of a tar read from ``f``.

    With ``tar_path`` (a local uncompressed tar) members are windows into the file and their data is
    never read here; otherwise member bytes are spooled (``materialize``) or skipped (listing only).
    A member header with a bad checksum is reported (``where#@offset``) and the reader resynchronises
    on the next valid header; a member whose data is cut short is reported and ends the shard.
    """
    br = _BlockReader(f, seekable=tar_path is not None, size=size)
    long_name: str | None = None
    pax: dict = {}
    n_videos = 0
    resyncing = False
    while True:
        offset = br.pos
        block = br.read(_TAR_BLOCK)
        if len(block) == 0:
            break
        if len(block) < _TAR_BLOCK:
            ctx.fail(f"{where}#@{offset}", f"truncated tar: {len(block)} stray bytes at the end")
            break
        if block == b"\0" * _TAR_BLOCK:
            if resyncing:
                continue
            break                                               # end-of-archive marker
        try:
            hdr = _tar_header(block)
        except ValueError as e:
            if not resyncing:
                guess = e.args[1] if len(e.args) > 1 and e.args[1].isprintable() else ""
                ctx.fail(f"{where}#{guess or '@' + str(offset)}",
                         f"corrupt tar member header at byte {offset} ({e.args[0]}); member skipped")
                resyncing = True
                long_name, pax = None, {}
            continue
        resyncing = False
        name = long_name or pax.get("path") or hdr["name"]
        msize = int(pax["size"]) if "size" in pax else hdr["size"]
        typ = hdr["type"]
        data_off = br.pos
        padded = -(-msize // _TAR_BLOCK) * _TAR_BLOCK
        if typ in (b"L", b"x", b"g", b"K"):
            data = br.read(padded)[:msize]
            if len(data) < msize:
                ctx.fail(f"{where}#@{offset}", f"truncated tar: extended header at byte {offset} is cut short")
                break
            if typ == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            elif typ == b"x":
                pax = _pax_records(data)
            continue
        long_name, pax = None, {}
        while name.startswith("./"):
            name = name[2:]
        is_video = typ in (b"0", b"\0", b"7") and is_video_name(name)
        uri = f"{where}#{name}"
        if not is_video:
            if br.skip(padded) < msize:
                if typ in (b"0", b"\0", b"7"):
                    ctx.fail(uri, f"truncated tar member: declares {msize} bytes, data cut short")
                break
            continue
        if tar_path is not None:
            if size is not None and data_off + msize > size:
                ctx.fail(uri, f"truncated tar member: declares {msize} bytes, only "
                              f"{max(0, size - data_off)} present")
                break
            br.skip(padded)
            n_videos += 1
            yield _Entry(uri, (lambda p=tar_path, o=data_off, s=msize, u=uri, n=name: _window_item(p, o, s, u, n))
                         if materialize else None)
            continue
        if not materialize:
            got = br.skip(padded)
            if got < msize:
                ctx.fail(uri, f"truncated tar member: declares {msize} bytes, only {got} present")
                break
            n_videos += 1
            yield _Entry(uri, None)
            continue
        # Streamed tar: spool the member now (the stream cannot come back to it).
        got = [0]

        def counted(n=msize):
            for block_ in br.chunks(n):
                got[0] += len(block_)
                yield block_
        try:
            item = _spool_item(counted(), uri, Path(name).name)
        except InputError as e:
            ctx.fail(e.input, e.reason)
            item = None
        if got[0] < msize:
            if item is not None:
                item._keep.delete()
            ctx.fail(uri, f"truncated tar member: declares {msize} bytes, only {got[0]} present")
            break
        br.skip(padded - msize)
        if item is not None:
            n_videos += 1
            yield _Entry(uri, (lambda it=item: it))
    if n_videos == 0:
        log.info("%s: no video members", where)


# ---------------------------------------------------------------------------------------------- streams
def _stream_name(spec: str) -> str:
    """A file-like name for a pipe: command or URL (its last path component)."""
    if spec.startswith("pipe:"):
        try:
            toks = shlex.split(spec[5:])
        except ValueError:
            toks = spec[5:].split()
        last = toks[-1] if toks else "stream"
        return Path(last.split("?", 1)[0]).name or "stream"
    path = spec.split("://", 1)[-1].split("?", 1)[0].split("#", 1)[0]
    return Path(path).name or "stream"


class _Stream:
    """Bytes of a ``pipe:`` command or URL, with a clear error when the producer fails."""

    def __init__(self, spec: str, cwd: Path | None):
        self.spec = spec
        self._proc = None
        self._err = None
        if spec.startswith("pipe:"):
            self._err = tempfile.TemporaryFile()
            try:
                self._proc = subprocess.Popen(spec[5:], shell=True, stdout=subprocess.PIPE, stderr=self._err,
                                              cwd=str(cwd) if cwd else None)
            except OSError as e:
                raise InputError(spec, f"cannot run command: {e}") from None
            self.f = self._proc.stdout
        else:
            if not spec.startswith(URL_SCHEMES):
                raise InputError(spec, "unsupported URL scheme (use http://, https://, file:// or pipe:)")
            import urllib.error
            import urllib.request
            try:
                self.f = urllib.request.urlopen(spec, timeout=60)
            except (urllib.error.URLError, OSError, ValueError) as e:
                raise InputError(spec, f"cannot fetch: {getattr(e, 'reason', None) or e}") from None

    def abort(self) -> None:
        """Stop a still-running producer (the consumer stopped early) and reap it."""
        try:
            self.f.close()
        except Exception:
            pass
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if self._err is not None and not self._err.closed:
            self._err.close()

    def finish(self) -> None:
        """Close; raise InputError if a pipe command failed."""
        try:
            self.f.close()
        except Exception:
            pass
        if self._proc is not None:
            rc = self._proc.wait()
            self._err.seek(0)
            tail = self._err.read()[-400:].decode("utf-8", "replace").strip()
            self._err.close()
            if rc != 0:
                raise InputError(self.spec, f"command exited with status {rc}" + (f": {tail}" if tail else ""))


def _iter_stream(spec: str, cwd: Path | None, ctx: _Ctx, materialize: bool) -> Iterator[_Entry]:
    """A pipe:/URL spec: one video, or a tar stream (detected by the ustar magic at byte 257)."""
    name = _stream_name(spec)
    looks_tar = _lower_ext(name, TAR_EXTS)
    if not materialize and not looks_tar:
        yield _Entry(spec, None)                        # listing a single streamed video: do not fetch it
        return
    try:
        stream = _Stream(spec, cwd)
    except InputError as e:
        ctx.fail(e.input, e.reason)
        return
    try:
        head = _read_n(stream.f, _TAR_BLOCK)
        is_tar = len(head) == _TAR_BLOCK and head[257:262] == b"ustar"
        if _lower_ext(name, (".tar.gz", ".tgz")) or head[:2] == b"\x1f\x8b":
            import gzip
            raw = io.BufferedReader(_Prepend(head, stream.f))
            gz = gzip.GzipFile(fileobj=raw)
            yield from _iter_tar(gz, spec, ctx, tar_path=None, size=None, materialize=materialize)
        elif is_tar:
            yield from _iter_tar(io.BufferedReader(_Prepend(head, stream.f)), spec, ctx, tar_path=None,
                                 size=None, materialize=materialize)
        else:
            def chunks():
                yield head
                while block := stream.f.read(_CHUNK):
                    yield block
            try:
                item = _spool_item(chunks(), spec, name)
            except InputError:
                stream.finish()               # a failed command is the better reason (raises first)
                raise
            stream.finish()
            yield _Entry(spec, lambda it=item: it)
            return
        stream.finish()
    except InputError as e:
        ctx.fail(e.input, e.reason)
    except (OSError, EOFError) as e:
        ctx.fail(spec, f"read failed: {e}")
    finally:
        stream.abort()


class _Prepend(io.RawIOBase):
    """A raw stream that first returns ``head`` then continues with ``rest``."""

    def __init__(self, head: bytes, rest: BinaryIO):
        super().__init__()
        self._head, self._rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self._head:
            n = min(len(buf), len(self._head))
            buf[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._rest.read(len(buf))
        buf[:len(data)] = data
        return len(data)


# ---------------------------------------------------------------------------------------------- expansion
def _iter_dir(root: Path, where: str, ctx: _Ctx, materialize: bool) -> Iterator[_Entry]:
    found = 0

    def onerror(e: OSError) -> None:
        ctx.fail(e.filename or where, f"cannot list directory: {e.strerror or e}")

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn.startswith(".") or not is_video_name(fn):
                continue
            p = Path(dirpath) / fn
            found += 1
            yield _Entry(str(p), (lambda p=p: _local_item(p, str(p), p.name)) if materialize else None)
    if found == 0:
        ctx.fail(where, f"directory contains no video files ({' '.join(VIDEO_EXTS)})")


def _iter_list(path: Path, ctx: _Ctx, materialize: bool, depth: int) -> Iterator[_Entry]:
    if depth > MAX_LIST_DEPTH:
        ctx.fail(str(path), f"list files nested deeper than {MAX_LIST_DEPTH} (a cycle?)")
        return
    try:
        fh = open(path, "r", encoding="utf-8")
    except OSError as e:
        ctx.fail(str(path), f"cannot read list file: {e.strerror or e}")
        return
    entries = 0
    with fh:
        lineno = 0
        while True:
            try:
                line = fh.readline()
            except UnicodeDecodeError as e:
                ctx.fail(f"{path}:{lineno + 1}", f"list file is not UTF-8 text ({e.reason})")
                return
            if not line:
                break
            lineno += 1
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            entries += 1
            yield from _expand(entry, ctx, materialize, base=path.parent, depth=depth + 1,
                               origin=f"{path}:{lineno}")
    if entries == 0:
        ctx.fail(str(path), "list file has no entries (only blank or comment lines)")


def _iter_clips(spec: str, ctx: _Ctx, materialize: bool) -> Iterator[_Entry]:
    from . import clips as _clips

    names = [n.strip() for n in spec[len("clips:"):].split(",") if n.strip()] or list(_clips.CLIPS)
    unknown = [n for n in names if n not in _clips.CLIPS]
    if unknown:
        ctx.fail(spec, f"unknown clip(s) {', '.join(unknown)} (known: {', '.join(_clips.CLIPS)})")
        names = [n for n in names if n in _clips.CLIPS]
    if not names:
        return
    if not materialize:                              # listing: no download
        for n in names:
            yield _Entry(f"clips:{n}", None)
        return
    try:
        paths = _clips.fetch_clips(names=names)
    except InputError as e:
        ctx.fail(f"{spec} ({e.input})", e.reason)
        return
    for n in names:
        clip = _clips.CLIPS[n]
        p = paths[n]
        yield _Entry(f"clips:{n}", (lambda p=p, n=n, c=clip: _local_item(p, f"clips:{n}", n, c.shots))
                     if materialize else None)


def _brace_expand(spec: str) -> list[str]:
    """``a{0..2}b`` → ``[a0b, a1b, a2b]`` and ``{x,y}`` lists, as webdataset does (braceexpand)."""
    try:
        from braceexpand import braceexpand
    except ImportError:                              # pragma: no cover - installed with webdataset
        return [spec]
    try:
        return list(braceexpand(spec))
    except Exception:
        return [spec]


def _expand(spec: str, ctx: _Ctx, materialize: bool, base: Path | None = None, depth: int = 0,
            origin: str | None = None) -> Iterator[_Entry]:
    """Expand one spec into entries, lazily. ``base``: folder for relative paths (a list file's);
    ``origin``: ``list.txt:LINE`` when the spec came from a list file (added to error reasons)."""
    spec = str(spec)
    note = f" (listed at {origin})" if origin else ""
    if spec.startswith("clips:"):
        yield from _iter_clips(spec, ctx, materialize)
        return
    if "{" in spec and not (base or Path(".")).joinpath(os.path.expanduser(spec)).exists():
        expanded = _brace_expand(spec)             # webdataset shard notation: shard-{000..009}.tar
        if len(expanded) > 1:
            for one in expanded:
                yield from _expand(one, ctx, materialize, base, depth, origin)
            return
    if spec.startswith("pipe:") or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", spec):
        yield from _iter_stream(spec, base, ctx, materialize)
        return
    p = Path(os.path.expanduser(spec))
    if base is not None and not p.is_absolute():
        p = base / p
    if not p.exists() and _glob.has_magic(str(p)):
        matches = sorted(m for m in _glob.iglob(str(p), recursive=True)
                         if os.path.isfile(m) and (is_video_name(m) or _lower_ext(m, TAR_EXTS)))
        if not matches:
            ctx.fail(str(p), "glob matched no video files or tar shards" + note)
            return
        for m in matches:
            yield from _expand_path(Path(m), ctx, materialize, depth, note)
        return
    yield from _expand_path(p, ctx, materialize, depth, note)


def _expand_path(p: Path, ctx: _Ctx, materialize: bool, depth: int, note: str = "") -> Iterator[_Entry]:
    uri = str(p)
    if p.is_dir():
        yield from _iter_dir(p, uri, ctx, materialize)
        return
    if not p.exists():
        ctx.fail(uri, "no such file or directory" + note)
        return
    name = p.name
    if _lower_ext(name, LIST_EXTS):
        yield from _iter_list(p, ctx, materialize, depth)
    elif _lower_ext(name, TAR_EXTS):
        yield from _iter_tar_file(p, ctx, materialize)
    elif is_video_name(name):
        yield _Entry(uri, (lambda: _local_item(p, uri, name)) if materialize else None)
    else:
        ctx.fail(uri, "unsupported file type (expected a video "
                      f"{'/'.join(VIDEO_EXTS)}, a tar shard {'/'.join(TAR_EXTS)} or a list "
                      f"{'/'.join(LIST_EXTS)})" + note)


def _iter_tar_file(p: Path, ctx: _Ctx, materialize: bool) -> Iterator[_Entry]:
    try:
        f = open(p, "rb")
    except OSError as e:
        ctx.fail(str(p), f"cannot read: {e.strerror or e}")
        return
    with f:
        magic = f.read(2)
        f.seek(0)
        try:
            if magic == b"\x1f\x8b":
                import gzip
                with gzip.GzipFile(fileobj=f) as gz:
                    yield from _iter_tar(gz, str(p), ctx, tar_path=None, size=None, materialize=materialize)
            else:
                yield from _iter_tar(f, str(p), ctx, tar_path=p, size=p.stat().st_size, materialize=materialize)
        except (OSError, EOFError) as e:                     # gzip errors surface as OSError / EOFError
            ctx.fail(str(p), f"corrupt compressed tar: {e}")


def _as_list(specs) -> list[str]:
    if isinstance(specs, (str, os.PathLike)):
        return [str(specs)]
    return [str(s) for s in specs]


# ---------------------------------------------------------------------------------------------- public
def iter_videos(specs, errors: ErrorLog | None = None, dedupe: bool = True) -> Iterator[VideoItem]:
    """Lazily yield a :class:`VideoItem` per video found in ``specs`` (one spec or a list), in order.

    With ``errors=None`` the first bad input raises InputError; otherwise it is recorded and skipped.
    ``dedupe``: an item whose id was already yielded (same bytes listed twice) is skipped.
    """
    ctx = _Ctx(errors)
    seen: set[str] = set()
    for spec in _as_list(specs):
        for entry in _expand(spec, ctx, materialize=True):
            try:
                item = entry.make()
            except InputError as e:
                ctx.fail(e.input, e.reason)
                continue
            if dedupe:
                if item.id in seen:
                    log.info("%s: same bytes as an earlier video (id %s), skipped", item.uri, item.id)
                    continue
                seen.add(item.id)
            yield item


def list_videos(specs, errors: ErrorLog | None = None) -> Iterator[str]:
    """Lazily yield the uri of every video in ``specs`` without hashing or fetching single videos.

    Tar shards are read for their headers (streamed tars are read through); missing paths, empty
    directories and corrupt tar headers are errors as in :func:`iter_videos`.
    """
    ctx = _Ctx(errors)
    for spec in _as_list(specs):
        for entry in _expand(spec, ctx, materialize=False):
            yield entry.uri
