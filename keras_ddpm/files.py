"""Files written whole or not at all, JSON I/O, and checks that an output can be written before long work.

Every file the project writes (config.json, log.csv, PNGs, .npz archives, best weights, cached statistics)
goes through `atomic_path`: the content is written to a temporary file beside the target and renamed onto
it, and a rename within one folder is atomic, so a crash leaves the old file or the new one, never half of
one. (SavedModel exports are folders; `keras_ddpm.export` publishes them with the same idea.)
"""

import contextlib
import json
import pathlib
import uuid
from typing import Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path) -> Iterator[pathlib.Path]:
    """Yield a temporary path beside `path`; when the block succeeds it is renamed onto `path`, else deleted.

    The temporary name keeps the target's extensions (`best.weights.h5` -> `best.partial-1a2b3c4d.weights.h5`),
    because some writers insist on them (Keras' `save_weights`, NumPy's `savez`). Parent folders are created.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem, dot, extensions = path.name.partition(".")
    partial = path.with_name(f"{stem}.partial-{uuid.uuid4().hex[:8]}{dot}{extensions}")
    try:
        yield partial
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)  # only left when the block failed


def write_bytes(path, data: bytes) -> pathlib.Path:
    """Write `data` to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as partial:
        partial.write_bytes(data)
    return pathlib.Path(path)


def write_text(path, text: str) -> pathlib.Path:
    """Write `text` to `path` atomically (see `atomic_path`)."""
    return write_bytes(path, text.encode())


def read_json(path) -> dict:
    with open(path) as file:
        return json.load(file)


def write_json(path, values: dict) -> pathlib.Path:
    """Write JSON (indented, sorted keys) atomically: a crash leaves the old file or the new one."""
    return write_text(path, json.dumps(values, indent=2, sort_keys=True) + "\n")


def save_npz(path, **arrays) -> pathlib.Path:
    """`np.savez_compressed`, atomically (a crash leaves no half-written file)."""
    with atomic_path(path) as partial:
        np.savez_compressed(partial, **arrays)
    return pathlib.Path(path)


def check_writable(folder, create: bool = True) -> pathlib.Path:
    """Make sure `folder` can be written to, before any long work starts; create it unless `create` is False.

    With `create=False` nothing is left behind when the work fails later: the probe goes into the nearest folder
    that exists, where the writer would create `folder`.
    """
    folder = pathlib.Path(folder)
    existing = folder
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        # A dangling symlink counts as existing: the writer could not create a folder there, nor can the probe.
        while not (existing.exists() or existing.is_symlink()) and existing != existing.parent:
            existing = existing.parent
        probe = existing / f".write_test-{uuid.uuid4().hex[:8]}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"Cannot write to {folder}: {error.strerror}.") from error
    return folder


def check_output_file(path) -> pathlib.Path:
    """`check_writable` for a file about to be written: it must not be a folder, and its folder must be writable
    (it is created with the file, so a run that fails first leaves no empty folder)."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give the path of a file to write, e.g. {path / 'grid.png'}.")
    check_writable(path.parent, create=False)
    return path
