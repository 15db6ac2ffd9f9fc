"""Greet whoever POSTs to /hello: API Gateway HTTP API (payload 2.0) in, a response out.

The name comes from the JSON body (``{"name": "edge"}``), else the ``name`` query
parameter, else "world". Invoked directly (``flowrun invoke hello -p '{"name": "edge"}'``)
the event itself may carry the name.
"""

import base64
import json


def _name(event: dict) -> str:
    if event.get("name") and "requestContext" not in event:  # invoked directly: {"name": ...}
        return str(event["name"])
    body = event.get("body") or ""
    if event.get("isBase64Encoded"):
        body = base64.b64decode(body).decode("utf-8", "replace")
    try:
        document = json.loads(body) if body else {}
    except ValueError:
        document = {}
    if isinstance(document, dict) and document.get("name"):
        return str(document["name"])
    query = event.get("queryStringParameters") or {}
    return str(query.get("name") or "world")


def handler(event, context):
    event = event or {}
    request = event.get("requestContext", {}).get("http", {})
    greeting = {
        "message": f"Hello, {_name(event)}!",
        "method": request.get("method"),
        "path": event.get("rawPath"),
        "requestId": context.aws_request_id,
    }
    return {
        "statusCode": 200,
        "headers": {"content-type": "application/json"},
        "body": json.dumps(greeting),
    }
