"""Reading job configurations (YAML + ``--set key=value`` overrides, validated by pydantic) and the settings block
that every job shares.

Every problem is a :class:`~distillrec.errors.ConfigError` whose message names the file and key and the fix: an unknown
or misspelt key, a value out of range, a file that is not YAML or not UTF-8, an override that does not parse.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError


class RuntimeSettings(BaseModel):
    """How a job runs, not what it computes: no result depends on these (they are left out of every config key)."""

    model_config = ConfigDict(extra="forbid")

    num_threads: int | None = Field(None, ge=1)  # torch intra-op threads (None: config.auto_threads)
    device: str | None = None  # LM jobs: cpu, cuda, cuda:N; None/auto: cuda:LOCAL_RANK when available, else cpu
    progress: bool = True  # progress bars with ETA

    def apply(self) -> int:
        return set_num_threads(self.num_threads)


class JobSettings(RuntimeSettings):
    """The settings block of every method job (``distillrec tpad``, ``align``, ``embed``, ``method``): the seed and the
    output folder next to the runtime settings. Run configs (``distillrec train``) hold the same runtime settings in
    their ``train`` block, with ``seeds`` (several) instead of ``seed``."""

    seed: int = 0
    out: str | None = None  # the output folder (the command's --out wins)


RUNTIME_KEYS = set(RuntimeSettings.model_fields)


def set_num_threads(n: int | None) -> int:
    """The one place that sets torch's thread count; returns it. ``n`` None: :func:`auto_threads`."""
    import torch

    _AUTO["last"] = "num_threads set in the config" if n else f"auto: {_AUTO.get('reason') or ''}"
    n = n or auto_threads()
    if not _AUTO["last"].startswith("num_threads"):
        _AUTO["last"] = f"auto: {_AUTO['reason']}"
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


_AUTO: dict[str, Any] = {}


def auto_threads() -> int:
    """The default thread count: ``OMP_NUM_THREADS`` when set, else this process's CPUs minus those other processes
    keep busy right now (sampled over 0.2 s from ``/proc/stat``, once per process), at least 1.

    Why: torch's default takes every core, and on a machine shared with another CPU-bound process its threads then
    wait on each other at every parallel region (measured on 2 cores: a training job beside one busy process ran
    several times slower with 2 threads than with 1; ``benchmarks/shared_cpu.py``). The CLI also sets OpenMP's
    wait policy to PASSIVE (``distillrec.cli``), so a thread that waits sleeps instead of spinning on a shared core.
    The choice and its reason are in ``auto_threads_reason()``, which the trainer writes to ``train.log``."""
    if "n" in _AUTO:
        return _AUTO["n"]
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        _AUTO.update(n=int(env), reason=f"OMP_NUM_THREADS={env}")
        return _AUTO["n"]
    import torch

    cpus = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
               torch.get_num_threads())
    busy = other_busy_cpus()
    n = max(1, cpus - int(round(busy))) if busy is not None else cpus
    _AUTO.update(n=n, reason=f"{cpus} CPU(s), {busy if busy is None else round(busy, 2)} kept busy by other "
                             "processes")
    return n


def auto_threads_reason() -> str:
    """Why the last :func:`set_num_threads` chose its count."""
    return _AUTO.get("last", "torch's default")


def other_busy_cpus(interval: float = 0.2) -> float | None:
    """How many CPUs other processes keep busy, from two reads of ``/proc/stat`` (None where there is none)."""
    import time

    def read() -> tuple[int, int, int]:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        ticks = [int(x) for x in fields[:8]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return sum(ticks), ticks[3] + ticks[4], int(own[11]) + int(own[12])  # total, idle + iowait, our utime+stime

    try:
        t0, idle0, self0 = read()
        time.sleep(interval)
        t1, idle1, self1 = read()
    except (OSError, ValueError, IndexError):
        return None
    n_cpu = sum(1 for line in Path("/proc/stat").read_text().splitlines() if line[:3] == "cpu" and line[3:4].isdigit())
    if t1 <= t0 or not n_cpu:
        return None
    busy_ticks = (t1 - t0) - (idle1 - idle0) - (self1 - self0)
    return max(0.0, busy_ticks / ((t1 - t0) / n_cpu))


def format_validation_error(err: ValidationError, source: str, prefix: str = "") -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        key = prefix + ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  - unknown key '{key}': remove it or check its spelling")
        elif e["type"] == "missing":
            lines.append(f"  - missing key '{key}': it is required")
        else:
            lines.append(f"  - '{key}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=0.01`` -> (["train", "lr"], 0.01); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set '{text}': expected key=value, e.g. --set train.lr=0.001")
    key, value = text.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(value)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"--set '{text}': the value is not valid YAML ({first}); quote it or fix the brackets") \
            from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set '{item}': '{part}' is not a section")
        node[path[-1]] = value
    return raw


def read_config(
    source: str | Path | dict[str, Any], overrides: list[str] | None, model: type[BaseModel], keys: str
) -> tuple[Any, str]:
    """Read a YAML file (or a dict), apply ``--set`` overrides and validate it with ``model``.

    Returns (validated config, source name); every problem is a ConfigError that names the key and the fix."""
    if isinstance(source, dict):
        raw, name = copy.deepcopy(source), "config"  # overrides must not change the caller's dict
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' not found" + (" (it is a folder)" if path.is_dir() else ""))
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        name = str(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: the top level must be a mapping with keys {keys}")
    raw = apply_overrides(raw, overrides or [])
    try:
        return model(**raw), name
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, name)) from None
