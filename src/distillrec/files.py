"""Writing files so that a kill never leaves half of one, and fingerprints of folders. The lowest layer: every other
layer (feature caches, LM conversion, checkpoints, run folders, method outputs) writes through these helpers.

Output folders are locked while a process writes them (:func:`folder_lock`, taken by :func:`prepare_out`): a second
writer to the same folder is refused with the holder's pid named. The lock is an ``fcntl.flock`` on
``<folder>/.distillrec.lock``, so the operating system releases it when the holder dies: a killed run never blocks
the next one.

Checkpoints are one safetensors file each: model and optimizer tensors plus plain JSON state in the metadata (no
pickle: optimizer state is flattened to tensors, everything else is JSON). The resumable multi-optimiser stage
checkpoints of :mod:`distillrec.training.checkpoint` are folders of these files.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError

META_KEY = "distillrec"


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` writes a temporary sibling file, which is then renamed over ``path``: a kill (or a concurrent
    writer) never leaves half a file. The one single-file writer; the helpers below use it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_save_tensors(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
    """``safetensors`` file of torch tensors (contiguous copies), written atomically."""
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                                    metadata=metadata))


def write_folder_atomically(final: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` fills a temporary sibling folder, which then replaces ``final``: a kill leaves the old folder or
    the new one, never a half-written one."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(final)
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def folder_fingerprint(path: str | Path, suffixes: tuple[str, ...] | None = None) -> str:
    """sha256 over the relative names and contents of the files under ``path`` (only those ending in ``suffixes``
    when given), in sorted order: equal for equal contents wherever the folder is copied."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != LOCK_FILE
                   and (suffixes is None or p.name.endswith(suffixes)))
    for f in files:
        h.update(str(f.relative_to(path)).encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- checkpoint files
def _flatten_optimizer(optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().clone().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def save_checkpoint(path: str | Path, model: Any, state: dict[str, Any], optimizer: Any | None = None) -> Path:
    """Model (and optimizer) tensors + JSON ``state`` in one safetensors file, written atomically."""
    tensors = {f"model.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
    meta: dict[str, Any] = {"state": state}
    if optimizer is not None:
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        tensors.update(opt_tensors)
        meta["optimizer"] = opt_meta
    if not tensors:  # safetensors needs at least one tensor
        import torch

        tensors["_"] = torch.zeros(1)
    return atomic_save_tensors(path, tensors, {META_KEY: json.dumps(meta)})


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .errors import DataError

    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or foreign file: name it
        raise DataError(f"{path}: not a readable distillrec checkpoint ({type(e).__name__}: {e}); delete it (and "
                        "restart the run) or restore it from a copy") from None
    return tensors, meta


def read_state(path: str | Path) -> dict[str, Any]:
    """The JSON state saved with a checkpoint."""
    return _read(Path(path))[1]["state"]


def load_checkpoint(path: str | Path, model: Any, optimizer: Any | None = None) -> dict[str, Any]:
    """Restore model (and optimizer) in place; returns the JSON state saved with them."""
    tensors, meta = _read(Path(path))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    if optimizer is not None and "optimizer" in meta:
        opt_meta = meta["optimizer"]
        state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, key = k.split(".", 2)
                state.setdefault(int(idx), {})[key] = v
        for k, v in opt_meta["scalars"].items():
            idx, key = k.split(".", 1)
            state.setdefault(int(idx), {})[key] = v
        optimizer.load_state_dict({"state": state, "param_groups": opt_meta["param_groups"]})
    return meta["state"]


# ---------------------------------------------------------------------------------------------- output folders
LOCK_FILE = ".distillrec.lock"
_HELD: dict[str, int] = {}  # resolved folder -> file descriptor of its lock, for the folders this process holds
_HELD_GUARD = threading.Lock()


def make_out(out: str | Path) -> Path:
    """Create the output folder ``out`` (with its parents): a ConfigError naming it when it is a file or cannot be
    made or written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out '{out}' is a file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"out '{out}': cannot create the folder ({e.strerror}); give a writable --out") from None
    return out


def _holder(lock: Path) -> str:
    try:
        text = lock.read_text().strip()
    except OSError:
        text = ""
    return text or "a process that has not written its pid yet"


def _acquire(out: Path) -> bool:
    """Lock ``out`` for this process; False when this process holds it already. A ConfigError naming the folder and
    the holding process when another process holds it."""
    key = str(out.resolve())
    with _HELD_GUARD:
        if key in _HELD:
            return False
        lock = out / LOCK_FILE
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ConfigError(f"out '{out}': cannot write in the folder ({e.strerror}); give a writable --out"
                                  ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise ConfigError(f"'{out}' is being written by another process ({_holder(lock)}); wait for it to "
                                  "finish (or stop it), or give another --out") from None
            try:  # the previous holder may have removed the file between our open and our lock: lock the new one
                if os.path.samestat(os.fstat(fd), os.stat(lock)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        command = " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])[:300]
        info = (f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                f"{command}\n")
        os.ftruncate(fd, 0)
        os.write(fd, info.encode())
        _HELD[key] = fd
        return True


def _release(out: Path) -> None:
    with _HELD_GUARD:
        fd = _HELD.pop(str(out.resolve()), None)
        if fd is None:
            return
        with contextlib.suppress(OSError):
            (out / LOCK_FILE).unlink()  # while still locked: nobody else can hold this file
        os.close(fd)


@atexit.register
def _release_all() -> None:
    for key in list(_HELD):
        _release(Path(key))


@contextlib.contextmanager
def folder_lock(out: str | Path) -> Iterator[Path]:
    """Create ``out`` (see :func:`make_out`) and hold its lock inside the ``with`` block (re-entrant in one process:
    an inner lock of a folder this process holds is a no-op). Another process holding it is a ConfigError that names
    the folder and its pid; a dead holder's lock is released by the operating system."""
    out = make_out(out)
    taken = _acquire(out)
    try:
        yield out
    finally:
        if taken:
            _release(out)


def prepare_out(out: str | Path, outputs: Sequence[str], *, restart: bool, marker: str) -> Path:
    """Create the output folder ``out`` of a command (an error when it is a file or cannot be made) and lock it for
    the rest of this process (unless this process holds it already, e.g. inside :func:`folder_lock`): a second
    writer is refused. With ``restart``, remove the entries named in ``outputs`` -- what the command writes -- but
    only from a folder that holds its ``marker`` file (or none of those entries): a user's other files are never
    touched."""
    out = make_out(out)
    taken = _acquire(out)
    try:
        if restart:
            ours = [out / name for name in outputs if (out / name).exists() or (out / name).is_symlink()]
            if ours and not (out / marker).is_file():
                raise ConfigError(f"--restart: '{out}' does not look like a run of this command (no {marker}); "
                                  "nothing was deleted: give another --out")
            for p in ours:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    except BaseException:
        if taken:
            _release(out)
        raise
    return out
