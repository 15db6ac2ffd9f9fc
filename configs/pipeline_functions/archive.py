"""Step 2b: keep the parsed records as JSON lines in ARCHIVE_DIR/<file stem>.jsonl.

ARCHIVE_DIR defaults to data/outbox/archive, relative to the config's folder.
"""

import json
import os
from pathlib import Path

import records
from paths import from_config


def handler(event, context):
    parsed = event["responsePayload"]
    folder = from_config(os.environ.get("ARCHIVE_DIR", "data/outbox/archive"))
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / (Path(parsed["file"]).stem + ".jsonl")
    temp = folder / f".{final.name}.{context.aws_request_id}.tmp"
    rows = 0
    with open(temp, "w", encoding="utf-8") as file:
        for row in records.read(parsed["records"]):
            file.write(json.dumps(row) + "\n")
            rows += 1
    os.replace(temp, final)  # same content on a re-run: the step is idempotent
    return {"archived": str(final), "rows": rows}
