"""One-line text progress bars for a training job and a generation, as the
CLI and ``Client.wait(progress=True)`` draw them."""

from __future__ import annotations

import sys
import time
from typing import TextIO


from lossd._jobs import GenerateProgress, JobEvent


def _format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    """A one-line text progress bar for a job: epoch, bar, loss, examples/s and ETA."""

    def __init__(self, file: TextIO = sys.stderr, width: int = 30):
        self.file, self.width = file, width
        self.tty = getattr(file, "isatty", lambda: False)()
        self.last_metrics: dict = {}

    def update(self, event: JobEvent) -> None:
        if event.kind == "progress" and event.epochs:
            fraction = ((event.epoch - 1) + event.step / max(event.steps_per_epoch, 1)) / event.epochs
            filled = int(round(fraction * self.width))
            line = (f"epoch {event.epoch}/{event.epochs} [{'#' * filled}{'.' * (self.width - filled)}] "
                    f"{fraction * 100:5.1f}%  loss {event.loss:.4f}  {event.examples_per_second:,.0f} img/s  "
                    f"ETA {_format_seconds(event.eta_seconds)}")
            self._write(line, final=False)
        elif event.kind == "epoch":
            metrics = "  ".join(f"{k} {v:.4f}" for k, v in sorted(event.metrics.items()))
            self._write(f"epoch {event.epoch}/{event.epochs} done in {event.seconds:.1f}s  {metrics}", final=True)
        elif event.kind == "state":
            text = f"state: {event.state}"
            if event.error is not None:
                text += f" ({event.error.reason}: {event.error.message})"
            self._write(text, final=True)
        elif event.kind == "message":
            self._write(event.message, final=True)

    def _write(self, line: str, *, final: bool) -> None:
        if self.tty:
            self.file.write("\r\x1b[2K" + line + ("\n" if final else ""))
        elif final or line:
            # Not a terminal (a log file, CI): progress lines only every so often.
            if final or not hasattr(self, "_last") or time.monotonic() - self._last > 5:
                self._last = time.monotonic()
                self.file.write(line + "\n")
        self.file.flush()


class GenerateBar(ProgressBar):
    """``ProgressBar``'s line for a generation: steps, bar, elapsed time and ETA."""

    def update(self, item: GenerateProgress) -> None:  # type: ignore[override]
        filled = int(round(item.step / max(item.steps, 1) * self.width))
        line = (f"step {item.step}/{item.steps} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"{_format_seconds(item.elapsed_seconds)} elapsed  ETA {_format_seconds(item.eta_seconds)}")
        self._write(line, final=item.done)
