"""A heartbeat: append one line per scheduled run to HEARTBEAT_FILE and return the time.

The EventBridge Scheduled Event carries the scheduled ``time``; the line holds it and the
time the handler actually ran, so a late or missed beat is easy to see.
"""

import datetime
import os

from paths import from_config


def handler(event, context):
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    scheduled = (event or {}).get("time", "")
    target = from_config(os.environ.get("HEARTBEAT_FILE", "data/heartbeat.log"))
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a", encoding="utf-8") as file:
        file.write(f"{now}\tscheduled={scheduled}\trequest={context.aws_request_id}\n")
    return {"time": now, "scheduled": scheduled}
