"""Writing files so that a kill never leaves half of one, and fingerprints of folders. The lowest layer: every other
layer (feature caches, LM conversion, checkpoints, run folders, method outputs) writes through these helpers.

Checkpoints are one safetensors file each: model and optimizer tensors plus plain JSON state in the metadata (no
pickle: optimizer state is flattened to tensors, everything else is JSON). The resumable multi-optimiser stage
checkpoints of :mod:`distillrec.training.checkpoint` are folders of these files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Sequence
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
    files = sorted(p for p in path.rglob("*") if p.is_file() and (suffixes is None or p.name.endswith(suffixes)))
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


def prepare_out(out: str | Path, outputs: Sequence[str], *, restart: bool, marker: str) -> Path:
    """Create the output folder ``out`` of a command (an error when it is a file or cannot be made). With
    ``restart``, remove the entries named in ``outputs`` -- what the command writes -- but only from a folder that
    holds its ``marker`` file (or none of those entries): a user's other files are never touched."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out '{out}' is a file; give a folder")
    if restart and out.is_dir():
        ours = [out / name for name in outputs if (out / name).exists()]
        if ours and not (out / marker).is_file():
            raise ConfigError(f"--restart: '{out}' does not look like a run of this command (no {marker}); "
                              "nothing was deleted: give another --out")
        for p in ours:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"out '{out}': cannot create the folder ({e.strerror}); give a writable --out") from None
    return out
