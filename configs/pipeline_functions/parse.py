"""Step 1: read the CSV the file trigger names, stage its rows, and hand on a reference.

The event is the S3 notification the file trigger sends (``Records[0].flowrun.path`` is the
local path), or ``{"path": "some.csv"}`` when invoked by hand. The rows are written as JSON
lines to STAGING_DIR/<file stem>.jsonl (default data/outbox/staging) and the result names
that file, not the rows: an asynchronous event is at most 256 KB, as on Lambda, so a
pipeline passes large data by reference — the way a Lambda pipeline passes an S3 key.
"""

import csv
import json
import os
from pathlib import Path

from paths import from_config


def source_path(event: dict) -> Path:
    if event.get("Records"):
        return Path(event["Records"][0]["flowrun"]["path"])
    return from_config(event["path"])


def handler(event, context):
    path = source_path(event)
    staging = from_config(os.environ.get("STAGING_DIR", "data/outbox/staging"))
    staging.mkdir(parents=True, exist_ok=True)
    staged = staging / (path.stem + ".jsonl")
    temp = staging / f".{staged.name}.{context.aws_request_id}.tmp"
    rows = 0
    with open(path, newline="", encoding="utf-8-sig") as source, \
            open(temp, "w", encoding="utf-8") as target:
        reader = csv.DictReader(source)
        for row in reader:
            target.write(json.dumps(row) + "\n")
            rows += 1
    os.replace(temp, staged)  # same content on a re-run: the step is idempotent
    return {"file": path.name, "records": str(staged), "rows": rows,
            "columns": reader.fieldnames or []}
