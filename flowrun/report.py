"""``flowrun report``: per-function totals, percentiles, GB-seconds and cost from the ledger."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from flowrun.config import BillingConfig
from flowrun.ledger import LedgerRow

_SINCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str) -> float:
    """``30s``, ``15m``, ``1h``, ``2d``, ``1w`` → seconds."""
    match = _SINCE.match(text)
    if not match:
        raise ValueError(f"expected a duration like 30s, 15m, 1h, 2d or 1w, got {text!r}")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(frozen=True)
class FunctionReport:
    function: str
    invocations: int
    errors: int
    throttles: int
    timeouts: int
    cold_starts: int
    p50_ms: float
    p95_ms: float
    max_ms: float
    billed_ms: int
    gb_seconds: float
    cpu_ms: float
    cost_usd: float


def summarize(rows: Iterable[LedgerRow], billing: BillingConfig) -> list[FunctionReport]:
    grouped: dict[str, list[LedgerRow]] = {}
    for row in rows:
        grouped.setdefault(row.function, []).append(row)
    out = []
    for name in sorted(grouped):
        group = grouped[name]
        ran = [r for r in group if r.status != "throttled"]
        durations = sorted(r.duration_ms for r in ran)
        billed = sum(r.billed_duration_ms for r in ran)
        gb_s = sum(r.billed_duration_ms / 1000 * r.memory_size_mb / 1024 for r in ran)
        cost = gb_s * billing.price_per_gb_second + len(ran) * billing.price_per_million_requests / 1e6
        out.append(FunctionReport(
            function=name,
            invocations=len(ran),
            errors=sum(1 for r in ran if r.status in ("error", "timeout")),
            throttles=sum(1 for r in group if r.status == "throttled"),
            timeouts=sum(1 for r in ran if r.status == "timeout"),
            cold_starts=sum(1 for r in ran if r.init_duration_ms is not None),
            p50_ms=round(percentile(durations, 50), 3),
            p95_ms=round(percentile(durations, 95), 3),
            max_ms=round(durations[-1], 3) if durations else 0.0,
            billed_ms=billed,
            gb_seconds=round(gb_s, 12),
            cpu_ms=round(sum(r.cpu_user_ms + r.cpu_system_ms for r in ran), 3),
            cost_usd=round(cost, 15),  # a request costs $0.0000002
        ))
    return out


HEADERS = ("function", "invocations", "errors", "throttles", "timeouts", "cold_starts",
           "p50_ms", "p95_ms", "max_ms", "billed_ms", "gb_seconds", "cpu_ms", "cost_usd")


def render(reports: list[FunctionReport], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([asdict(r) for r in reports], indent=2) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(HEADERS)
        for r in reports:
            writer.writerow([getattr(r, h) for h in HEADERS])
        return buffer.getvalue()
    if not reports:
        return "no invocations in this period\n"
    cells = [list(HEADERS)]
    for r in reports:
        row = asdict(r)
        row["gb_seconds"] = f"{r.gb_seconds:.6f}"
        row["cost_usd"] = f"${r.cost_usd:.8f}"
        cells.append([str(row[h]) for h in HEADERS])
    total_cost = sum(r.cost_usd for r in reports)
    total_gbs = sum(r.gb_seconds for r in reports)
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADERS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(row, widths, strict=True))) for row in cells]
    lines.append(f"total: {sum(r.invocations for r in reports)} invocations, "
                 f"{total_gbs:.6f} GB-s, ${total_cost:.8f}")
    return "\n".join(lines) + "\n"
