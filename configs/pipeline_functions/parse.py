"""Step 1: read the CSV the file trigger names and return its rows as records.

The event is the S3 notification the file trigger sends (``Records[0].flowrun.path`` is the
local path), or ``{"path": "some.csv"}`` when invoked by hand.
"""

import csv
from pathlib import Path

from paths import from_config


def source_path(event: dict) -> Path:
    if event.get("Records"):
        return Path(event["Records"][0]["flowrun"]["path"])
    return from_config(event["path"])


def handler(event, context):
    path = source_path(event)
    with open(path, newline="", encoding="utf-8-sig") as file:
        rows = list(csv.DictReader(file))
    return {"file": path.name, "rows": rows}
