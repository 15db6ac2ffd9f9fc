"""Step 3: write step 2a's statistics to REPORT_DIR/<file stem>.json."""

import json
import os
from pathlib import Path

from paths import from_config


def handler(event, context):
    stats = event["responsePayload"]
    folder = from_config(os.environ.get("REPORT_DIR", "data/outbox/reports"))
    folder.mkdir(parents=True, exist_ok=True)
    report = {**stats, "pipelineRequestId": event["requestContext"]["requestId"]}
    final = folder / (Path(stats["file"]).stem + ".json")
    temp = folder / f".{final.name}.tmp"
    temp.write_text(json.dumps(report, indent=2), encoding="utf-8")
    os.replace(temp, final)
    return report
