"""The command line: a thin layer over config, Runtime, the ledger and the management API."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from flowrun import config as config_module
from flowrun.config import Config, ConfigError

EPILOG = """examples:
  flowrun run configs/flowrun.yaml          run the daemon (Ctrl-C stops it gracefully)
  flowrun validate configs/flowrun.yaml     check a config, exit 1 on errors
  flowrun invoke hello --payload '{"name": "edge"}' -c configs/flowrun.yaml
  flowrun report --since 1h --format table -c configs/flowrun.yaml
  flowrun logs summarize --follow -c configs/flowrun.yaml
"""


def _config_path(args: argparse.Namespace) -> str:
    return str(getattr(args, "config_pos", None) or args.config or
               config_module.DEFAULT_CONFIG_NAME)


def _load(args: argparse.Namespace) -> Config:
    return config_module.load(_config_path(args))


def _api_call(config: Config, method: str, path: str, body: bytes | None = None,
              headers: dict[str, str] | None = None,
              timeout_s: float = 900) -> tuple[int, dict[str, str], bytes] | None:
    """Call the running daemon's management API; None when no daemon answers."""
    if config.api is None:
        return None
    request = urllib.request.Request(f"http://{config.api.listen}{path}", data=body,
                                     method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


# ------------------------------------------------------------------------- commands


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    """uvloop when installed (``auto``) or asked for, else asyncio's own loop."""
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise SystemExit("flowrun: --loop uvloop needs the uvloop package "
                                 "(pip install uvloop); --loop asyncio works without it") from None
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(message)s" if not args.verbose else
                        "%(asctime)s %(name)s %(levelname)s %(message)s")
    from flowrun.runtime import Runtime

    runtime = Runtime(config)
    names = ", ".join(config.functions) or "none"
    print(f"flowrun: {_count(len(config.functions), 'function')} ({names}), "
          f"{_count(len(config.triggers), 'trigger')}; state in {config.state_dir}", flush=True)
    loop = new_event_loop(args.loop)  # the worker pool keeps it polling while replies are due
    print(f"event loop: {'uvloop' if type(loop).__module__.startswith('uvloop') else 'asyncio'}",
          flush=True)
    try:
        loop.run_until_complete(runtime.serve())
    finally:
        loop.close()
    print("flowrun: stopped", flush=True)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    config = _load(args)
    missing = config_module.code_issues(config)
    if missing:
        raise ConfigError(missing)
    kinds: dict[str, int] = {}
    for trigger in config.triggers:
        kinds[trigger.type] = kinds.get(trigger.type, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    print(f"{_config_path(args)}: ok — {_count(len(config.functions), 'function')}, "
          f"{_count(len(config.triggers), 'trigger')}" + (f" ({summary})" if summary else ""))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(config_module.json_schema(), indent=2))
    return 0


def _payload(text: str | None) -> bytes:
    if text is None:
        return b"{}"
    if text.startswith("@"):
        try:
            data = sys.stdin.buffer.read() if text == "@-" else Path(text[1:]).read_bytes()
        except OSError as exc:
            raise SystemExit(f"flowrun invoke: --payload {text}: cannot read: "
                             f"{exc.strerror or exc}") from None
    else:
        data = text.encode()
    try:
        json.loads(data)
    except ValueError as exc:
        raise SystemExit(f"flowrun invoke: --payload is not valid JSON: {exc}") from None
    return data


def cmd_invoke(args: argparse.Namespace) -> int:
    config = _load(args)
    payload = _payload(args.payload)
    headers = {"Content-Type": "application/json",
               "X-Amz-Invocation-Type": "Event" if args.async_ else "RequestResponse",
               "X-Amz-Log-Type": "Tail"}
    answer = _api_call(config, "POST", f"/2015-03-31/functions/{args.name}/invocations",
                       payload, headers)
    if answer is not None:
        status, response_headers, body = answer
        lowered = {k.lower(): v for k, v in response_headers.items()}
        if "x-amz-log-result" in lowered and args.logs:
            import base64

            sys.stderr.write(base64.b64decode(lowered["x-amz-log-result"]).decode())
        sys.stdout.write(body.decode() + ("\n" if body and not body.endswith(b"\n") else ""))
        if status == 202:  # the same answer as queueing without a daemon
            print(json.dumps({"StatusCode": 202, "RequestId": lowered.get("x-amzn-requestid")}))
            return 0
        return 0 if status < 300 and "x-amz-function-error" not in lowered else 1
    return asyncio.run(_invoke_locally(config, args.name, payload, args.async_, args.logs))


async def _invoke_locally(config: Config, name: str, payload: bytes, async_: bool,
                          logs: bool) -> int:
    from flowrun.runtime import Runtime
    from flowrun.types import FlowrunError

    if async_:
        print(f"flowrun: no daemon answering; queueing in {config.state_dir} for the next "
              "'flowrun run'", file=sys.stderr)
    else:
        print("flowrun: no daemon answering; invoking in this process", file=sys.stderr)
    try:
        async with Runtime(config, start_triggers=False, serve_api=False,
                           run_queue=False) as runtime:
            result = await runtime.invoke_json(name, payload, mode="event" if async_ else "sync",
                                               source="cli")
    except FlowrunError as exc:
        print(json.dumps(exc.to_dict()))
        return 1
    if logs:
        from flowrun.logs import lines

        sys.stderr.write(lines(result))
    if async_:
        print(json.dumps({"StatusCode": 202, "RequestId": result.request_id}))
        return 0
    if result.ok:
        print(result.payload_json)
        return 0
    print(json.dumps(result.error))
    return 1


def cmd_report(args: argparse.Namespace) -> int:
    from flowrun.ledger import read_rows
    from flowrun.report import parse_since, render, summarize

    config = _load(args)
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        raise SystemExit(f"flowrun report: --since: {exc}") from None
    if args.function and args.function not in config.functions:
        raise SystemExit(f"flowrun report: no function named {args.function!r}; "
                         f"defined: {', '.join(sorted(config.functions)) or 'none'}")
    rows = read_rows(config.state_dir, since, args.function)
    sys.stdout.write(render(summarize(rows, config.billing), args.format))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from flowrun.logs import follow

    config = _load(args)
    if args.name not in config.functions:
        raise SystemExit(f"flowrun logs: no function named {args.name!r}; "
                         f"defined: {', '.join(sorted(config.functions)) or 'none'}")
    path = config.state_dir / "logs" / f"{args.name}.log"
    if not args.follow:
        if not path.exists():
            print(f"flowrun logs: {args.name} has no invocations yet ({path})", file=sys.stderr)
            return 0
        lines = path.read_text(encoding="utf-8").splitlines()
        for line in lines[-args.lines:] if args.lines else lines:
            print(line)
        return 0

    async def tail() -> None:
        async for line in follow(path):
            print(line, flush=True)

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        pass
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    config = _load(args)
    answer = _api_call(config, "GET", "/status", timeout_s=5)
    if answer is None or answer[0] != 200:
        status: dict[str, Any] = {"running": False, "config": _config_path(args),
                                  "state_dir": str(config.state_dir),
                                  "functions": sorted(config.functions)}
        from sandbox.limits import detect

        status["limits"] = detect.describe_host()
        from flowrun import pipeline, queue

        status["queues"] = queue.pending_counts(config.state_dir, config.functions)
        status["pipelines"] = pipeline.describe(config, status["queues"])
    else:
        status = {"running": True, **json.loads(answer[2])}
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        _print_status(status)
    return 0


def _print_status(status: dict[str, Any]) -> None:
    if not status["running"]:
        print(f"flowrun: not running (no daemon answering for {status['config']})")
    else:
        print(f"flowrun: running, pid {status['pid']}, up {status['uptime_s']} s")
    print(f"state: {status['state_dir']}")
    print("limits:")
    for key, value in (status.get("limits") or {}).items():
        print(f"  {key:<10} {value}")
    functions = status.get("functions") or {}
    if isinstance(functions, dict):
        print("functions:")
        for name, info in functions.items():
            print(f"  {name:<16} " + " ".join(f"{k}={v}" for k, v in info.items()))
    else:
        print("functions: " + ", ".join(functions))
    for trigger in status.get("triggers") or []:
        details = " ".join(f"{k}={v}" for k, v in trigger.items() if k not in ("name",))
        print(f"  trigger {trigger['name']}: {details}")
    from flowrun.pipeline import render

    for line in render(status.get("pipelines") or []):
        print(line)
    for key, value in status.items():
        if key not in ("running", "pid", "uptime_s", "state_dir", "limits", "functions",
                       "triggers", "config", "pipelines"):
            print(f"{key}: {json.dumps(value)}")


# ------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowrun", description="flowrun — an event-driven function runtime: "
        "a Lambda you run yourself.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="flowrun 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, positional_config: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if positional_config:
            p.add_argument("config_pos", nargs="?", metavar="CONFIG",
                           help="config file (default ./flowrun.yaml)")
        p.add_argument("-c", "--config", help="config file (default ./flowrun.yaml)")
        return p

    p = command("run", "run the daemon: workers, triggers and the management API",
                positional_config=True)
    p.add_argument("-v", "--verbose", action="store_true", help="timestamps and logger names")
    p.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                   help="event loop: uvloop when installed (auto, the default; about a third "
                        "faster warm invocations) or asyncio's own")
    p.set_defaults(func=cmd_run)
    p = command("validate", "check a configuration; exit 1 and list every error",
                positional_config=True)
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("schema", help="print the configuration's JSON Schema (for editors)")
    p.set_defaults(func=cmd_schema)
    p = command("invoke", "invoke a function (through the daemon if one runs, else here)")
    p.add_argument("name", help="function name")
    p.add_argument("--payload", "-p", help="event as JSON, or @file, or @- for stdin")
    p.add_argument("--async", dest="async_", action="store_true",
                   help="queue the invocation durably and return at once (202)")
    p.add_argument("--logs", action="store_true", help="print the invocation's log to stderr")
    p.set_defaults(func=cmd_invoke)
    p = command("report", "invocations, errors, durations, GB-seconds and cost per function")
    p.add_argument("--since", help="only this recent: 30s, 15m, 1h, 2d, 1w (default: all)")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument("--function", help="only this function")
    p.set_defaults(func=cmd_report)
    p = command("logs", "print a function's START/END/REPORT log")
    p.add_argument("name", help="function name")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    p.add_argument("--lines", "-n", type=int, default=0, help="only the last N lines")
    p.set_defaults(func=cmd_logs)
    p = command("status", "what the daemon runs, which limits are enforced, trigger states")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)
    from flowrun import dlq

    dlq.add_commands(command("dlq", "dead letters: list, show, redrive, purge"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
