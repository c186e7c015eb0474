"""File integrity: full-content digests (sha256, streamed), a digest cache keyed by file identity, and the
"nobody else can write here" check for folders whose files are unpickled.

* :func:`file_digest` hashes every byte (sha256, about 0.7-1 GB/s per core on the benchmark machine,
  ``benchmarks/hashing.py``: a 70B model in bf16, 140 GB, costs about 3 minutes of one core, once per copy).
* :func:`cached_file_digest` remembers the digest of a file under its identity -- device, inode, size, mtime_ns and
  ctime_ns -- in a small JSON file (``$PALU_DS_CACHE/file_digests.json``, default ``~/.cache/palu_ds``), so a model
  is hashed once per copy on disk and every later run pays a ``stat``. Any write to the file changes its mtime/ctime
  (ctime cannot be set back by ``touch``), so a changed file is always rehashed.
* :func:`check_not_writable_by_others`: DeepSpeed's checkpoint loader unpickles its files (``torch.load`` with
  ``weights_only=False``), which runs code a crafted file contains; a checkpoint folder must therefore be trusted, and
  we refuse one that another user could have written.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat

from palu_ds.atomic import write_json

ALGO = "sha256"
_CHUNK = 1 << 24


def file_digest(path: str) -> str:
    """``sha256:<hex>`` of every byte of ``path`` (streamed, constant memory)."""
    h = hashlib.new(ALGO)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return f"{ALGO}:{h.hexdigest()}"


def cache_path() -> str:
    from palu_ds.models import cache_root  # the one home of the cache folder

    return os.path.join(cache_root(), "file_digests.json")


def _identity(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def cached_file_digest(path: str, cache: str | None = None) -> str:
    """:func:`file_digest`, reused while the file's identity (device, inode, size, mtime, ctime) is unchanged."""
    cache = cache or cache_path()
    real = os.path.realpath(path)
    ident = _identity(real)
    try:
        with open(cache, encoding="utf-8") as f:
            known = json.load(f)
    except (OSError, ValueError):  # no cache yet, or an unreadable one: start afresh
        known = {}
    entry = known.get(real)
    if isinstance(entry, dict) and entry.get("identity") == ident and entry.get("digest", "").startswith(ALGO):
        return entry["digest"]
    digest = file_digest(real)
    if _identity(real) != ident:  # written to while we read it: do not remember a torn digest
        return digest
    known[real] = {"identity": ident, "digest": digest}
    try:
        # concurrent runs: the last writer wins, every version is whole
        write_json(cache, known, indent=None, suffix=f".{os.getpid()}.tmp")
    except OSError:
        pass  # a read-only home: the digest is still right, only not remembered
    return digest


def check_not_writable_by_others(paths) -> None:
    """Raise PermissionError naming the first of ``paths`` that a user other than us (and root) can write: owned by
    someone else, or group/world writable."""
    me = os.getuid()
    for p in paths:
        st = os.stat(p)
        if st.st_uid not in (me, 0) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise PermissionError(
                f"{p} can be written by other users (owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)}): "
                "checkpoint files are unpickled on resume, which runs any code a crafted file holds, so palu_ds "
                f"resumes only from folders that only you can write. If you trust it, run `chmod -R go-w` on it "
                "(and make it yours) first.")


def make_private(root: str) -> None:
    """Remove group/world write permission from ``root`` (a file, or a folder and everything under it)."""
    if not os.path.isdir(root):
        mode = os.stat(root).st_mode
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            os.chmod(root, mode & ~(stat.S_IWGRP | stat.S_IWOTH))
        return
    for d, _, files in os.walk(root):
        for p in [d] + [os.path.join(d, f) for f in files]:
            mode = os.stat(p).st_mode
            if mode & (stat.S_IWGRP | stat.S_IWOTH):
                os.chmod(p, mode & ~(stat.S_IWGRP | stat.S_IWOTH))
