"""Local paths and pyarrow filesystem URIs behind one small API.

Every reader and the shard writer go through these helpers, so a source root or an output directory may be
a local path or any URI `pyarrow.fs.FileSystem.from_uri` understands (file://, s3://, gs://, hdfs://).

    python -c "from dynloss.data.storage import resolve; print(resolve('file:///tmp'))"
"""

from __future__ import annotations

import os
import posixpath
import uuid

import pyarrow.fs as pafs


def is_uri(location: str) -> bool:
    return "://" in str(location)


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a filesystem URI."""
    location = str(location)
    if is_uri(location):
        fs, path = pafs.FileSystem.from_uri(location)
        return fs, path.rstrip("/") or "/"
    # LocalFileSystem wants absolute paths; keep the user's spelling otherwise (no symlink resolution).
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))


def join(base: str, *parts: str) -> str:
    """Join with '/', which every pyarrow filesystem (local included) accepts."""
    return posixpath.join(base, *parts)


def display(location: str, *parts: str) -> str:
    """A location as the user wrote it, with parts appended (for messages and rejected.csv)."""
    location = str(location)
    return posixpath.join(location, *parts) if parts else location


def file_type(fs: pafs.FileSystem, path: str) -> pafs.FileType:
    return fs.get_file_info(path).type


def is_file(fs: pafs.FileSystem, path: str) -> bool:
    return file_type(fs, path) == pafs.FileType.File


def is_dir(fs: pafs.FileSystem, path: str) -> bool:
    return file_type(fs, path) == pafs.FileType.Directory


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(fs: pafs.FileSystem, path: str) -> str:
    return read_bytes(fs, path).decode("utf-8")


def list_dir(fs: pafs.FileSystem, path: str, recursive: bool = False) -> list[pafs.FileInfo]:
    """Entries under `path`, sorted by path, hidden names (starting with '.') left out."""
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    keep = [i for i in infos if not any(p.startswith(".") for p in posixpath.relpath(i.path, path).split("/"))]
    return sorted(keep, key=lambda i: i.path)


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write to a hidden temp name next to `path`, then move it in place.

    On a local disk the move is a rename, so a crash never leaves a half-written file under the final name;
    object stores make a whole object visible at once anyway.
    """
    parent = posixpath.dirname(path)
    fs.create_dir(parent, recursive=True)
    tmp = join(parent, f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def delete_file(fs: pafs.FileSystem, path: str) -> None:
    if is_file(fs, path):
        fs.delete_file(path)
