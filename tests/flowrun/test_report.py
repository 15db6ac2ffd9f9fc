"""``flowrun report``: billed durations, GB-seconds and cost from ledger rows, by hand."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import math
import time
from pathlib import Path

import pytest
from waiting import eventually

from flowrun.config import BillingConfig
from flowrun.dispatcher import billed_ms
from flowrun.ledger import ROWS_PER_INSERT, ROWS_PER_SLICE, Ledger, LedgerRow, read_rows
from flowrun.report import FunctionReport, parse_since, percentile, render, summarize
from flowrun.types import InvocationResult

PRICE_GB_S = 0.0000166667
PRICE_REQUEST = 0.20 / 1_000_000


def row(function: str = "a", *, duration_ms: float = 10.0, billed: int = 10, memory_mb: int = 128,
        status: str = "success", init_ms: float | None = None, started_at: float = 1_000.0,
        cpu_user_ms: float = 0.0, cpu_system_ms: float = 0.0) -> LedgerRow:
    return LedgerRow(
        request_id=f"req-{duration_ms}-{status}", function=function, source="test",
        started_at=started_at, status=status,
        error_type=None if status == "success" else "Boom", duration_ms=duration_ms,
        billed_duration_ms=billed, memory_size_mb=memory_mb, max_memory_used_mb=40,
        init_duration_ms=init_ms, cpu_user_ms=cpu_user_ms, cpu_system_ms=cpu_system_ms,
        attempt=1)


# --------------------------------------------------------------------------- billed duration


@pytest.mark.parametrize(("duration_ms", "granularity_ms", "expected"), [
    (26.73, 1, 27),
    (27.0, 1, 27),
    (27.000001, 1, 28),
    (0.05, 1, 1),
    (0.0, 1, 1),
    (26.73, 100, 100),
    (100.0, 100, 100),
    (100.5, 100, 200),
    (999.9, 100, 1000),
    (1500.0, 1000, 2000),
])
def test_billed_duration_rounds_up_to_the_granularity(duration_ms: float, granularity_ms: int,
                                                      expected: int) -> None:
    assert billed_ms(duration_ms, granularity_ms) == expected


async def test_the_runtime_bills_with_the_configured_granularity(make_runtime) -> None:  # type: ignore[no-untyped-def]
    runtime = await make_runtime("""
        state_dir: state
        billing: {granularity_ms: 100}
        functions:
          sleep: {handler: handlers.sleep, code: "{functions}", memory_mb: 256}
    """)
    result = await runtime.invoke("sleep", {"seconds": 0.12})
    assert result.status == "success"
    assert result.duration_ms >= 120
    assert result.billed_duration_ms == math.ceil(result.duration_ms / 100) * 100
    assert result.billed_duration_ms % 100 == 0 and result.billed_duration_ms >= 200


# --------------------------------------------------------------------------- GB-seconds and cost


def test_gb_seconds_and_cost_match_hand_computed_figures() -> None:
    rows = [
        row("a", duration_ms=99.2, billed=100, memory_mb=128, init_ms=150.0),
        row("a", duration_ms=250.0, billed=300, memory_mb=128, status="error"),
        row("a", duration_ms=0.0, billed=0, memory_mb=128, status="throttled"),
        row("b", duration_ms=1000.0, billed=1000, memory_mb=1024, status="timeout"),
    ]
    a, b = summarize(rows, BillingConfig())
    # a: (0.1 s + 0.3 s) x 0.125 GB = 0.05 GB-s; two requests ran, the throttled one did not.
    assert (a.function, a.invocations, a.errors, a.throttles, a.timeouts) == ("a", 2, 1, 1, 0)
    assert a.cold_starts == 1
    assert a.billed_ms == 400
    assert a.gb_seconds == pytest.approx(0.05)
    assert a.cost_usd == pytest.approx(0.05 * PRICE_GB_S + 2 * PRICE_REQUEST)
    assert a.cost_usd == pytest.approx(1.233335e-06)
    # b: 1 s x 1 GB = 1 GB-s, one request; a timeout is an error too.
    assert (b.invocations, b.errors, b.timeouts, b.throttles) == (1, 1, 1, 0)
    assert b.gb_seconds == pytest.approx(1.0)
    assert b.cost_usd == pytest.approx(0.0000168667)


def test_a_configured_price_is_used() -> None:
    rows = [row(billed=2000, memory_mb=512), row(billed=1000, memory_mb=512)]
    billing = BillingConfig(price_per_gb_second=0.01, price_per_million_requests=1_000_000)
    (report,) = summarize(rows, billing)
    assert report.gb_seconds == pytest.approx(1.5)  # 3 s x 0.5 GB
    assert report.cost_usd == pytest.approx(1.5 * 0.01 + 2 * 1.0)


def test_cpu_time_is_summed() -> None:
    rows = [row(cpu_user_ms=3.5, cpu_system_ms=1.0), row(cpu_user_ms=0.5, cpu_system_ms=2.0)]
    assert summarize(rows, BillingConfig())[0].cpu_ms == pytest.approx(7.0)


# --------------------------------------------------------------------------- percentiles


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 100)) == (
        50.0, 95.0, 100.0)
    twenty = [float(v) for v in range(1, 21)]
    assert percentile(twenty, 95) == 19.0
    assert percentile([7.0], 50) == 7.0 == percentile([7.0], 95)
    assert percentile([], 50) == 0.0


def test_the_report_gives_p50_p95_and_max_of_the_invocations_that_ran() -> None:
    rows = [row(duration_ms=float(ms)) for ms in (5, 1, 4, 2, 3, 100, 6, 7, 8, 9)]
    rows.append(row(duration_ms=0.0, status="throttled"))
    (report,) = summarize(rows, BillingConfig())
    assert (report.p50_ms, report.p95_ms, report.max_ms) == (5.0, 100.0, 100.0)


# --------------------------------------------------------------------------- formats


def test_json_csv_and_table_carry_the_same_figures() -> None:
    reports = summarize([row("a", billed=100), row("b", billed=1000, memory_mb=1024)],
                        BillingConfig())
    as_json = json.loads(render(reports, "json"))
    assert [FunctionReport(**item) for item in as_json] == reports
    table = list(csv.DictReader(io.StringIO(render(reports, "csv"))))
    assert [r["function"] for r in table] == ["a", "b"]
    assert float(table[1]["gb_seconds"]) == pytest.approx(1.0)
    text = render(reports, "table")
    header, first, second, total = text.splitlines()
    assert header.split()[:3] == ["function", "invocations", "errors"]
    assert first.split()[0] == "a" and second.split()[0] == "b"
    assert total.startswith("total: 2 invocations, 1.012500 GB-s, $")
    assert render([], "table") == "no invocations in this period\n"


# --------------------------------------------------------------------------- --since


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30), ("15m", 900), ("1h", 3600), ("2d", 172_800), ("1w", 604_800), ("1.5h", 5400),
    (" 10m ", 600),
])
def test_since_accepts_seconds_minutes_hours_days_and_weeks(text: str, seconds: float) -> None:
    assert parse_since(text) == seconds


@pytest.mark.parametrize("text", ["", "1", "h", "1y", "-1h", "1 hour", "1h30m", "yesterday"])
def test_since_rejects_anything_else_and_says_what_is_valid(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_since(text)
    assert str(caught.value) == f"expected a duration like 30s, 15m, 1h, 2d or 1w, got {text!r}"


def test_rows_are_read_back_from_the_ledger_on_disk_by_age_and_function(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db").open()
    now = time.time()
    for function, age_s in (("a", 7200), ("a", 10), ("b", 10)):
        ledger.record(InvocationResult(f"{function}-{age_s}", function, "success",
                                       duration_ms=5.0, billed_duration_ms=5,
                                       memory_size_mb=128, started_at=now - age_s))
    ledger.close()
    assert len(read_rows(tmp_path)) == 3
    assert [r.request_id for r in read_rows(tmp_path, since_s=3600)] == ["a-10", "b-10"]
    assert [r.request_id for r in read_rows(tmp_path, since_s=3600, function="a")] == ["a-10"]
    assert read_rows(tmp_path / "nowhere") == []
    assert len(list(Ledger(tmp_path / "ledger.db").rows())) == 3  # read without open()


async def test_a_flush_of_more_rows_than_one_insert_holds_writes_every_row_in_order(
        tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db", flush_interval_s=60).open()
    count = ROWS_PER_INSERT * 2 + 7  # two full statements and a short one
    for n in range(count):
        ledger.record(InvocationResult(f"r-{n}", "f", "success", duration_ms=n / 10,
                                       billed_duration_ms=1, memory_size_mb=128,
                                       max_memory_used_mb=n % 50, started_at=1000.0 + n))
    ledger.close()
    rows = read_rows(tmp_path)
    assert [r.request_id for r in rows] == [f"r-{n}" for n in range(count)]
    assert [(r.duration_ms, r.max_memory_used_mb) for r in rows] == [
        (n / 10, n % 50) for n in range(count)]


async def test_a_timed_flush_of_a_big_batch_goes_in_slices_that_let_the_loop_run(
        tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db", flush_interval_s=0.01).open()
    count = ROWS_PER_SLICE * 3
    for n in range(count):
        ledger.record(InvocationResult(f"r-{n}", "f", "success", billed_duration_ms=1,
                                       memory_size_mb=128, started_at=1000.0 + n))
    seen: list[int] = []

    async def watch() -> None:  # runs whenever the loop gets a turn
        while True:
            seen.append(len(read_rows(tmp_path)))
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    try:
        await eventually(lambda: seen and seen[-1] == count)
    finally:
        watcher.cancel()
        ledger.close()
    assert any(0 < n < count for n in seen), "the loop got no turn between slices"
    assert len(read_rows(tmp_path)) == count


def test_rows_recorded_before_the_ledger_is_opened_are_not_dropped(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.record(InvocationResult("early", "f", "success", billed_duration_ms=1,
                                   memory_size_mb=128, started_at=1000.0))
    ledger.close()
    assert [r.request_id for r in read_rows(tmp_path)] == ["early"]
