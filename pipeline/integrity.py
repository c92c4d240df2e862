"""Digests of the files the pipeline makes (checkpoints, packages, ONNX models, engines), written when they are
made and checked whenever they are read, so that a file corrupted on disk is refused, never served.

The digest of an artifact is a sidecar `<artifact>.sha256` beside it, in `sha256sum` format: one line
`<sha256>  <path>` per file the artifact consists of (the file itself; an ONNX model's external data; every
file of a folder), paths relative to the artifact's folder, so `sha256sum -c` checks it there too and a
copied run folder keeps it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.core import PipelineError, file_digest

SUFFIX = ".sha256"

# (path, inode, size, mtime) -> digest of the files already checked in this process: a model read by
# several stages is hashed once, and any rewrite of it (new mtime or size) is hashed again.
_checked: dict[tuple, str] = {}


class IntegrityError(PipelineError):
    """A file's bytes differ from the digest written when it was made, or it has no digest."""


def sidecar(artifact: Path | str) -> Path:
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + SUFFIX)


def artifact_files(artifact: Path | str) -> list[Path]:
    """The files an artifact consists of: a folder's content, an ONNX model with its external data, or one file."""
    artifact = Path(artifact)
    if not artifact.exists():
        raise PipelineError(f"the artifact {artifact} is gone; run the stage that made it again")
    if artifact.is_dir():
        return sorted(p for p in artifact.rglob("*") if p.is_file())
    if artifact.suffix == ".onnx":
        import onnx
        from onnx.external_data_helper import ExternalDataInfo, uses_external_data

        graph = onnx.load_model(str(artifact), load_external_data=False).graph
        external = {ExternalDataInfo(t).location for t in graph.initializer if uses_external_data(t)}
        return [artifact, *(artifact.parent / name for name in sorted(external))]
    return [artifact]


def write_digest(artifact: Path | str) -> str:
    """Writes `<artifact>.sha256` for the artifact's files as they are now -> the digest of its first file."""
    artifact = Path(artifact)
    lines = [f"{file_digest([path])}  {path.relative_to(artifact.parent).as_posix()}" for path in artifact_files(artifact)]
    tmp = sidecar(artifact).with_name(sidecar(artifact).name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(sidecar(artifact))
    return lines[0].split()[0]


def recorded(artifact: Path | str) -> dict[str, str]:
    """The digests written when the artifact was made: relative path -> sha256."""
    path = sidecar(artifact)
    if not path.is_file():
        raise IntegrityError(f"{artifact} has no digest ({path.name} is missing beside it): it was not made by "
                             "this pipeline, or was copied without its digest; run the stage that made it again")
    entries = {}
    for line in path.read_text().splitlines():
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            raise IntegrityError(f"{path} is not a sha256 digest file (line {line[:80]!r})")
        entries[name] = digest
    if not entries:
        raise IntegrityError(f"{path} is empty: no digest to check {artifact} against")
    return entries


def verify_digest(artifact: Path | str) -> str:
    """Checks every file of the artifact against its sidecar -> the digest of its first file.

    Raises IntegrityError naming the file and both digests when the bytes differ, or when the sidecar or a
    file it lists is missing."""
    artifact = Path(artifact)
    entries = recorded(artifact)
    for name, expected in entries.items():
        path = artifact.parent / name
        if not path.is_file():
            raise IntegrityError(f"{path} is missing: {sidecar(artifact).name} lists it as part of {artifact.name}")
        stat = os.stat(path)
        key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        actual = _checked.get(key) or file_digest([path])
        if actual != expected:
            raise IntegrityError(
                f"{path} is corrupt: its sha256 is {actual}, but {expected} was recorded when it was made "
                f"({sidecar(artifact)}); run the stage that made it again")
        _checked[key] = actual
    return next(iter(entries.values()))


def copy_verified(src: Path | str, dst: Path | str) -> Path:
    """Copies a one-file artifact whose digest checks, with its digest (renamed to dst's name)."""
    src, dst = Path(src), Path(dst)
    digest = verify_digest(src)
    shutil.copy2(src, dst)
    sidecar(dst).write_text(f"{digest}  {dst.name}\n")
    return dst
