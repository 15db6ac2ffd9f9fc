"""Step 2a: row count, and min, max and mean of every column whose cells are all numbers."""

import math

import records


def _number(text):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def handler(event, context):
    parsed = event["responsePayload"]  # step 1's result, inside Lambda's invocation record
    rows = list(records.read(parsed["records"]))
    columns = {}
    for name in parsed["columns"]:
        values = [_number(row.get(name)) for row in rows]
        if values and all(v is not None for v in values):
            columns[name] = {"min": min(values), "max": max(values),
                             "mean": round(sum(values) / len(values), 6)}
    return {"file": parsed["file"], "rows": len(rows), "columns": columns}
