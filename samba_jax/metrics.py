"""Metrics out of the training loop: a log line, `metrics.jsonl` and TensorBoard (process 0 only).

`Throughput` turns step timings into tokens/s, achieved TFLOP/s per device, MFU and ETA. The FLOP
count is `samba_jax.config.flops_per_token` (MaxText's convention plus the scan's own work).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import jax

from samba_jax.config import peak_flops_per_device


class MetricWriter:
    """Appends records to `<workdir>/metrics.jsonl` and TensorBoard; silent on processes other than 0."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
            from tensorboardX import SummaryWriter  # TF-free TensorBoard writer, as MaxText uses

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if v is not None else None) for k, v in record.items()}
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._jsonl.flush()
        for key, value in clean.items():
            if value is not None and math.isfinite(value):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()


class Throughput:
    """Wall-clock accounting between log points; excludes time spent in eval and checkpoint saves."""

    def __init__(self, tokens_per_step: int, train_flops_per_token: float, total_steps: int):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = train_flops_per_token
        self.total_steps = total_steps
        devices = jax.devices()
        self.num_devices = len(devices)
        self.peak = peak_flops_per_device(devices[0].device_kind)
        self._start = time.perf_counter()
        self._steps = 0
        self._paused = 0.0

    def pause(self, pending: Any = None) -> "_Pause":
        """A block whose time is not counted. `pending`: arrays of the last dispatched train step; the
        pause starts once they are computed, so queued steps (JAX dispatches asynchronously, and the
        host runs ahead between log points) are counted as training, not as the eval that waits on them."""
        return _Pause(self, pending)

    def report(self, step: int) -> dict[str, float | None]:
        """Metrics for the steps since the last report; call after the step's results are ready."""
        elapsed = time.perf_counter() - self._start - self._paused
        steps = max(self._steps, 1)
        step_time = elapsed / steps
        tokens_per_sec = self.tokens_per_step / step_time
        tflops = tokens_per_sec * self.flops_per_token / self.num_devices / 1e12
        out = {
            "step_time": step_time,
            "tokens_per_sec": tokens_per_sec,
            "tflops_per_device": tflops,
            "mfu": tflops * 1e12 / self.peak if self.peak else None,
            "eta_seconds": step_time * (self.total_steps - step),
        }
        self._start, self._steps, self._paused = time.perf_counter(), 0, 0.0
        return out

    def tick(self) -> None:
        self._steps += 1


class _Pause:
    def __init__(self, tp: Throughput, pending: Any = None):
        self.tp, self.pending = tp, pending

    def __enter__(self):
        if self.pending is not None:
            jax.block_until_ready(self.pending)
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.tp._paused += time.perf_counter() - self.t0


def format_line(step: int, total: int, m: dict[str, Any]) -> str:
    """One human-readable log line."""
    eta = m.get("eta_seconds")
    eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta is not None and eta < 86400 * 99 else "-"
    mfu = f"{100 * m['mfu']:.1f}%" if m.get("mfu") is not None else "n/a"
    return (f"step {step}/{total} loss {m['loss']:.4f} lr {m['lr']:.3e} grad_norm {m['grad_norm']:.3f} "
            f"tok/s {m['tokens_per_sec']:,.0f} step {m['step_time'] * 1e3:.0f}ms "
            f"TFLOP/s/dev {m['tflops_per_device']:.2f} MFU {mfu} ETA {eta_s}")


_LOGGER = logging.getLogger("samba_jax")
_LOGGER.setLevel(logging.INFO)  # our lines stay visible when libraries are quietened to WARNING


def log(msg: str) -> None:
    """Logs on process 0 only."""
    if jax.process_index() == 0:
        _LOGGER.info(msg)
