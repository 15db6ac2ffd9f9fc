"""Reading the records step 1 staged (one JSON object per line)."""

import json
from collections.abc import Iterator


def read(path: str) -> Iterator[dict]:
    with open(path, encoding="utf-8") as file:
        for line in file:
            if line.strip():
                yield json.loads(line)
