"""What both benchmarks share: percentiles, the markdown table of figures, and saving results.

Why it exists: the discovery and ConfigEntry benchmarks report the same way (JSON plus a markdown table under
bench/results/); one copy keeps the two reports alike.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of `values`; NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def markdown_table(rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'figure'.ljust(width)} | value |", f"| {'-' * width} | ----- |"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines)


def save(name: str, results: dict[str, Any], table: str) -> None:
    """Write bench/results/<name>.json and <name>.md, and print the table."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table + "\n")
    print(table)


def settle(*, below: float = 1.0, at_most: float = 120.0) -> float:
    """Wait until the 1-minute load average is under `below` (the benchmark before this one, a heavy one, has
    finished its tail: its control plane torn down, its processes gone), for at most `at_most` seconds. Returns
    the seconds waited; the load average at start is reported beside the figures either way."""
    started = time.monotonic()
    while os.getloadavg()[0] >= below and time.monotonic() - started < at_most:
        time.sleep(2)
    return round(time.monotonic() - started, 1)
