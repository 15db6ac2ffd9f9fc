"""Handlers for the http trigger and management API tests, run in real worker processes."""

import base64
import time


def event(event, context):
    """Return the whole API Gateway event, as a bare value (a JSON 200)."""
    return event


def shaped(event, context):
    """A full 2.0 response: status, headers, cookies and a text body."""
    return {
        "statusCode": 201,
        "headers": {"Content-Type": "text/plain", "X-Custom": "yes"},
        "cookies": ["session=abc; Path=/", "theme=dark"],
        "body": "created " + (event.get("pathParameters") or {}).get("id", "?"),
    }


def binary_echo(event, context):
    """Send the request body back as bytes, base64-encoded in the response."""
    body = event.get("body") or ""
    data = base64.b64decode(body) if event.get("isBase64Encoded") else body.encode()
    return {
        "statusCode": 200,
        "headers": {"content-type": "application/octet-stream"},
        "body": base64.b64encode(data[::-1]).decode(),
        "isBase64Encoded": True,
    }


def bare_list(event, context):
    return [1, "two", {"three": 3}]


def status_without_code(event, context):
    return {"message": "no statusCode here", "status": 418}


def slow(event, context):
    time.sleep(1.5)
    return {"slept": True}


def forever(event, context):
    time.sleep(60)
    return "never"


def fail(event, context):
    raise RuntimeError("handler blew up")


def tagged(event, context):
    print("hello from the log")
    return {"echo": event, "request_id": context.aws_request_id}
