"""Summarise a CSV file: rows, columns, and min/max/mean of every numeric column.

Invoked by the file trigger with an S3 event notification (one record per settled file),
or directly with ``{"path": "some.csv"}``. Each summary is written as JSON to
``OUT_DIR/<file stem>.json`` (written to a temp file, then renamed, so readers never see a
half-written summary) and returned.
"""

import csv
import json
import logging
import math
import os
import urllib.parse
from pathlib import Path

from paths import from_config

log = logging.getLogger(__name__)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def summarize_csv(path: Path) -> dict:
    """Rows, columns, and per numeric column (every non-empty cell a number) min/max/mean."""
    with open(path, newline="", encoding="utf-8-sig") as file:
        reader = csv.reader(file)
        header = next(reader, [])
        rows = 0
        numeric = [True] * len(header)
        filled = [0] * len(header)
        low = [math.inf] * len(header)
        high = [-math.inf] * len(header)
        total = [0.0] * len(header)
        for row in reader:
            if not row:
                continue
            rows += 1
            for i, cell in enumerate(row[: len(header)]):
                cell = cell.strip()
                if not cell or not numeric[i]:
                    continue
                value = _number(cell)
                if value is None:
                    numeric[i] = False
                    continue
                filled[i] += 1
                low[i], high[i] = min(low[i], value), max(high[i], value)
                total[i] += value
    stats = {
        name: {"count": filled[i], "min": low[i], "max": high[i], "mean": total[i] / filled[i]}
        for i, name in enumerate(header)
        if numeric[i] and filled[i]
    }
    return {"file": path.name, "rows": rows, "columns": len(header), "column_names": header,
            "numeric": stats}


def _paths(event: dict) -> list[Path]:
    if "path" in event:
        return [from_config(event["path"])]
    paths = []
    for record in event.get("Records", []):
        if not record.get("eventName", "").startswith("ObjectCreated"):
            continue
        local = (record.get("flowrun") or {}).get("path")
        if local is None:  # fall back to the bucket (the watched folder) and the key
            bucket = record["s3"]["bucket"]["name"]
            key = urllib.parse.unquote_plus(record["s3"]["object"]["key"])
            local = os.path.join(bucket, key)
        paths.append(from_config(local))
    return paths


def _write_json(folder: Path, name: str, document: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    temp = folder / f".{name}.tmp"
    temp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    os.replace(temp, target)
    return target


def handler(event, context):
    out_dir = from_config(os.environ.get("OUT_DIR", "data/outbox"))
    summaries = []
    for path in _paths(event or {}):
        summary = summarize_csv(path)
        written = _write_json(out_dir, f"{path.stem}.json", summary)
        log.info("summarised %s: %d rows, %d columns -> %s", path, summary["rows"],
                 summary["columns"], written)
        summaries.append({**summary, "output": str(written)})
    return summaries[0] if len(summaries) == 1 else summaries
