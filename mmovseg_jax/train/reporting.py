"""Progress lines, `metrics.jsonl`, TensorBoard scalars and images (written by process 0 only)."""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path
from typing import Mapping

import jax

from mmovseg_jax.cli import bar


def _format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class Reporter:
    """Logs training progress: one line per log step (step, loss, lr, throughput, ETA), one
    JSON object per log step in WORKDIR/metrics.jsonl, and TensorBoard scalars in WORKDIR/tb."""

    def __init__(self, workdir: str | Path, total_steps: int, start_step: int = 0, tensorboard: bool = True):
        self.total_steps = total_steps
        self.main = jax.process_index() == 0
        self.start_step, self.start_time = start_step, time.perf_counter()
        self.metrics_path = Path(workdir) / "metrics.jsonl"
        self.writer = None
        if self.main and tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(Path(workdir) / "tb"))

    def truncate_after(self, step: int) -> None:
        """Drops metrics.jsonl records past `step` (a resumed run logs them again, identically)."""
        if not self.main or not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        if len(kept) != len(lines):
            self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def restart_clock(self, step: int) -> None:
        """Measure throughput and ETA from `step` on (e.g. after compilation)."""
        self.start_step, self.start_time = step, time.perf_counter()

    def log(self, step: int, metrics: Mapping[str, float], examples_per_step: int) -> dict:
        """Prints a progress line and writes the record; throughput and ETA are measured from
        the last `restart_clock` (None / unknown at that very step)."""
        elapsed = time.perf_counter() - self.start_time
        done = step - self.start_step
        rate = examples_per_step * done / elapsed if done > 0 and elapsed > 0 else None
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}, "examples_per_sec": rate}
        if self.main:
            eta = _format_eta(elapsed / done * (self.total_steps - step)) if rate else "?"
            extras = " | ".join(f"{k} {v:.4g}" for k, v in record.items()
                                if k not in ("step", "loss", "lr", "examples_per_sec"))
            print(f"step {step}/{self.total_steps} {bar(step / max(self.total_steps, 1))} | loss {record['loss']:.4f} | lr {record.get('lr', 0):.3g} | "
                  f"{f'{rate:.1f}' if rate else '-'} pairs/s | ETA {eta}" + (f" | {extras}" if extras else ""),
                  flush=True)
            self.write(record)
        return record

    def write(self, record: Mapping) -> None:
        """Appends a record to metrics.jsonl and its numbers to TensorBoard."""
        if not self.main:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()

    def image(self, tag: str, image, step: int) -> None:
        """An (H, W, 3) uint8 image to TensorBoard (process 0, when TensorBoard is on)."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
