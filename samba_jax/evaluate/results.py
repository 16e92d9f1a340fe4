"""Results files of the evaluation tasks: JSON that never overwrites, the run's context, progress."""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from typing import Any

import jax


def free_path(directory: str, name: str) -> str:
    """`directory/name`, or `stem-2.ext`, `stem-3.ext`, ... if taken: an earlier result is never overwritten."""
    os.makedirs(directory, exist_ok=True)
    stem, ext = os.path.splitext(name)
    path, n = os.path.join(directory, name), 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(directory, f"{stem}-{n}{ext}")
    return path


def write_json(directory: str, name: str, result: dict[str, Any]) -> str:
    path = free_path(directory, name)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


def run_context() -> dict[str, Any]:
    """Where and when: for comparing results across runs (never divide figures from different cards)."""
    device = jax.devices()[0]
    return {"date": datetime.date.today().isoformat(), "jax": jax.__version__, "backend": jax.default_backend(),
            "device": device.device_kind, "device_count": jax.device_count()}


def peak_memory_bytes() -> int | None:
    """The device's peak allocation so far (GPU/TPU; None where the backend keeps no statistics)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def device_memory_limit() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


class Progress:
    """One line on stderr, rewritten: done / total units, rate, ETA (tqdm where installed)."""

    def __init__(self, total: int, unit: str, desc: str):
        self.total, self.unit, self.desc, self.done = total, unit, desc, 0
        self.start = time.perf_counter()
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=unit, desc=desc, unit_scale=True, file=sys.stderr, leave=True)
        except ImportError:  # pragma: no cover - tqdm is a dependency
            self._bar = None

    def update(self, done: int) -> None:
        if self._bar is not None:
            self._bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
