"""Progress of a long compression: one line per finished unit (a block, or a data-free layer) with elapsed time,
an ETA from the mean time per unit so far, and (``logging.INFO``, the CLI's ``-v``) the process's RSS and its peak."""

from __future__ import annotations

import logging
import resource
import time

from tqdm.auto import tqdm

logger = logging.getLogger("hf_compress.progress")


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (Linux) in MiB; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """The process's peak resident set size so far, in MiB (Linux: VmHWM, which a benchmark may restart by
    writing 5 to /proc/self/clear_refs; elsewhere ``getrusage``)."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Linux: restart the kernel's peak-RSS counter (VmHWM) so the next reading covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def rss_mb(field: str = "VmRSS") -> float:
    """The process's resident set size now, in MiB (Linux; NaN elsewhere); ``field``: a part of it, e.g.
    ``"RssFile"`` (pages of mapped files, which the kernel can drop and read again) or ``"RssAnon"``."""
    now = _status_mb(field)
    return now if now is not None else float("nan")


def format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """``for i in Progress(range(n), "svd_llm", "block", bar=True): ...``: a tqdm bar (when ``bar``) and, after
    each unit, an INFO log line ``svd_llm: block 3/30 done (2.1 s); elapsed 0:07, ETA 0:57, RSS 2010 MiB, peak RSS
    2140 MiB`` (the resident set once the unit is done, and its peak so far).
    Units ``skipped`` (restored from a checkpoint) do not count towards the ETA."""

    def __init__(self, items, what: str, unit: str, bar: bool = True, skipped: int = 0):
        self.items, self.what, self.unit, self.skipped = list(items), what, unit, skipped
        self.bar = bar
        self.t0 = time.time()

    def __iter__(self):
        n = len(self.items)
        bar = tqdm(total=n, initial=self.skipped, desc=f"hf-compress {self.what}", disable=not self.bar, unit=self.unit)
        try:
            for k, item in enumerate(self.items):
                if k < self.skipped:
                    continue
                start = time.time()
                yield item
                bar.update(1)
                done = k + 1 - self.skipped
                elapsed = time.time() - self.t0
                eta = elapsed / done * (n - k - 1)
                logger.info("%s: %s %d/%d done (%.1f s); elapsed %s, ETA %s, RSS %.0f MiB, peak RSS %.0f MiB",
                            self.what, self.unit, k + 1, n, time.time() - start, format_seconds(elapsed),
                            format_seconds(eta), rss_mb(), peak_rss_mb())
        finally:
            bar.close()
