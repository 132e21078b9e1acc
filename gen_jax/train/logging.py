"""Metric writers (stdout, JSONL, TensorBoard) and the progress bar. Only process 0 writes."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np


def _scalar(v: Any) -> float:
    return float(np.asarray(v))


class MetricWriter:
    """Writes scalars to `<workdir>/metrics.jsonl`, TensorBoard event files in `<workdir>/tb`, and stdout."""

    def __init__(self, workdir: str, *, enabled: bool | None = None, tensorboard: bool = True,
                 stdout: bool = True):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.stdout = stdout
        self._tb = None
        self._jsonl = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter
                    self._tb = SummaryWriter(os.path.join(workdir, "tb"))
                except ImportError:  # optional: JSONL and stdout still work
                    self._tb = None

    def write(self, step: int, scalars: Mapping[str, Any], *, prefix: str = "", echo=None) -> None:
        if not self.enabled:
            return
        if self._jsonl is None:
            raise ValueError("MetricWriter.write() after close(); create a new MetricWriter to go on")
        values = {f"{prefix}{k}": _scalar(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **values}) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, int(step))
        if self.stdout:
            text = f"step {step}: " + ", ".join(f"{k}={v:.5g}" for k, v in values.items())
            (echo or print)(text)

    def write_image(self, step: int, name: str, image_HxWxC_uint8: np.ndarray) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_image(name, np.asarray(image_HxWxC_uint8), int(step), dataformats="HWC")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Progress:
    """A tqdm progress bar (steps/s, ETA) on process 0; quiet elsewhere."""

    def __init__(self, total: int, initial: int = 0, *, desc: str = "train", enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._bar = None
        if self.enabled:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                             file=sys.stderr, mininterval=1.0 if sys.stderr.isatty() else 15.0)

    def update(self, n: int, **postfix: float) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        elif self.enabled:
            print(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
