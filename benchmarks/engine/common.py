"""Shared by the engine benchmark's processes: tick signatures and /proc readings.

Latency is measured from the simulator's market step to the WebSocket client's receipt. The
snapshot JSON does not carry the simulator's latency probe (that lives in last_trade_time,
which the schema does not publish), so each step is identified by a signature of what the
client does see: exchange_ts (seconds), ltp, best bid/ask quantity and volume. The synthetic
market changes the depth quantities every step (a hash of the step count), so a signature
names one step; a match to more than one step is discarded, never guessed.

/proc is read directly (Linux only) rather than adding psutil for two numbers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

_P = (
    np.uint64(0x9E3779B97F4A7C15),
    np.uint64(0xC2B2AE3D27D4EB4F),
    np.uint64(0x165667B19E3779F9),
    np.uint64(0xD6E8FEB86659FD93),
    np.uint64(0xFF51AFD7ED558CCD),
)


def signature(ts_s, ltp_paise, bid_qty, ask_qty, volume) -> np.ndarray:
    """One uint64 per row from five integer columns (wrapping arithmetic on purpose)."""
    cols = [np.asarray(c).astype(np.int64).astype(np.uint64) for c in
            (ts_s, ltp_paise, bid_qty, ask_qty, volume)]
    with np.errstate(over="ignore"):
        out = np.zeros(cols[0].shape, dtype=np.uint64)
        for col, prime in zip(cols, _P, strict=True):
            out = (out ^ (col * prime)) * np.uint64(0x100000001B3)
    return out


_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (and its reaped children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _CLK_TCK


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE


def find_pids(comm: str) -> list[int]:
    """Pids whose command name is ``comm`` (e.g. redis-server)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == comm:
                    out.append(int(entry.name))
            except OSError:
                continue
    return out
