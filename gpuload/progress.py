"""A dependency-free progress line on stderr: counts, a rate, MB/s and, given a total, percent and time left."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def human(n: float) -> str:
    """1234567 -> '1.23M': short enough to keep the line on one terminal row."""
    n = float(n)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def clock(seconds: float) -> str:
    """Seconds as h:mm:ss or m:ss."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Counts named quantities and reports them on one line.

    On a terminal the line is redrawn in place (\\r) at most every `interval` seconds; into a file or
    pipe a plain line is printed every `interval` seconds (30 by default) so logs stay short.
    `update(nbytes=, advance=, **counts)` adds to the byte count, to the progress toward `total` and
    to named counters; `rate` names the counter shown per second.
    """

    def __init__(self, label: str, *, total: Optional[float] = None, rate: Optional[str] = None,
                 quiet: bool = False, stream: Optional[TextIO] = None, interval: Optional[float] = None):
        self.label = label
        self.total = total
        self.rate = rate
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.interval = interval if interval is not None else (0.1 if self.tty else 30.0)
        self.counts: dict[str, float] = {}
        self.nbytes = 0
        self.done = 0.0
        self.start = time.perf_counter()
        self.last_draw = self.start
        self.width = 0
        self.closed = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def update(self, *, nbytes: int = 0, advance: float = 0.0, **counts: float) -> None:
        self.nbytes += nbytes
        self.done += advance
        for name, value in counts.items():
            self.counts[name] = self.counts.get(name, 0) + value
        now = time.perf_counter()
        if not self.quiet and now - self.last_draw >= self.interval:
            self.last_draw = now
            self._draw(self.line(), final=False)

    def line(self, final: bool = False) -> str:
        """The current report, e.g. `prepare  42%  1.20k docs  3.40M tokens  12.0 MB  9.8 MB/s ...`."""
        elapsed = max(self.elapsed(), 1e-9)
        parts = [self.label]
        if self.total:
            parts.append(f"{100.0 * min(self.done / self.total, 1.0):3.0f}%")
        parts += [f"{human(value)} {name}" for name, value in self.counts.items()]
        parts.append(f"{self.nbytes / 1e6:.1f} MB")
        parts.append(f"{self.nbytes / 1e6 / elapsed:.1f} MB/s")
        if self.rate in self.counts:
            parts.append(f"{human(self.counts[self.rate] / elapsed)} {self.rate}/s")
        timing = clock(elapsed)
        if self.total and 0 < self.done < self.total and not final:
            timing += f", ~{clock(elapsed * (self.total - self.done) / self.done)} left"
        parts.append(timing)
        return "  ".join(parts)

    def _draw(self, text: str, final: bool) -> None:
        if self.tty:
            pad = " " * max(self.width - len(text), 0)  # blank out the tail of a longer previous line
            self.stream.write("\r" + text + pad + ("\n" if final else ""))
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Print the final line once (nothing when quiet)."""
        if self.closed:
            return
        self.closed = True
        if not self.quiet:
            self._draw(self.line(final=True), final=True)

    def abandon(self) -> None:
        """End the line without a final report (after an error), so the error message starts on its own line."""
        if not self.closed and not self.quiet and self.tty and self.width:
            self.stream.write("\n")
            self.stream.flush()
        self.closed = True
