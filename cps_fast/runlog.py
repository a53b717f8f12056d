"""Run logging: ``metrics.jsonl``, TensorBoard events (when tensorboard is installed) and a
progress line with rate and ETA that redraws in place on a terminal and stays quiet (one
line per log interval) otherwise."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Optional, TextIO


class MetricsLog:
    """Appends one JSON object per record to ``metrics.jsonl``; mirrors scalars to
    TensorBoard when available. Only rank 0 creates one."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except Exception:  # tensorboard not installed: jsonl alone
                self._tb = None

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        self._f.write(json.dumps(clean, sort_keys=True) + "\n")
        if self._tb is not None and "step" in record:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash: the rest stays usable
    return out


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """A progress line: ``step/total``, images/s, ETA and a short message."""

    def __init__(self, total: int, start: int = 0, desc: str = "train",
                 stream: Optional[TextIO] = None, enabled: bool = True):
        self.total, self.start, self.desc = total, start, desc
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self._last_draw = 0.0

    def rate(self, step: int, images_per_step: int) -> float:
        dt = time.perf_counter() - self.t0
        done = step - self.start
        return done * images_per_step / dt if dt > 0 and done > 0 else 0.0

    def eta(self, step: int) -> float:
        dt = time.perf_counter() - self.t0
        done = step - self.start
        return (self.total - step) * dt / done if done > 0 else float("nan")

    def update(self, step: int, images_per_step: int = 0, msg: str = "",
               force: bool = False) -> None:
        """On a terminal redraw at most 10×/s; elsewhere print only when ``force``d."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty and not force and now - self._last_draw < 0.1 and step < self.total:
            return
        if not self.tty and not force:
            return
        self._last_draw = now
        rate = self.rate(step, images_per_step)
        line = (f"{self.desc} {step}/{self.total} "
                + (f"{rate:.1f} img/s " if images_per_step else "")
                + f"eta {_fmt_time(self.eta(step))} {msg}").rstrip()
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
