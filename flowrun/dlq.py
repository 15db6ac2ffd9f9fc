"""The dead-letter store: asynchronous invocations that failed for good, kept to inspect and redrive.

Dead letters live in the ``dead_letters`` table of ``state_dir/queue.db``, next to the queue,
so that moving an invocation from the queue to the store is one transaction. Each row keeps
the original event, every attempt's error (``errors``, a JSON list), the timestamps and the
Lambda destination record the failure produced.

The ``flowrun dlq`` commands (``list``, ``show``, ``redrive``, ``purge``) work on the file
directly, whether or not a daemon runs: a redriven letter goes back into the queue as a
``new`` row with its original request id and a fresh event age, and the daemon picks new
rows up within a fraction of a second (or at its next start).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    function TEXT NOT NULL,
    event BLOB NOT NULL,
    source TEXT NOT NULL DEFAULT '',
    condition TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    errors TEXT NOT NULL DEFAULT '[]',
    enqueued_at REAL NOT NULL,
    failed_at REAL NOT NULL,
    record TEXT
);
CREATE INDEX IF NOT EXISTS dead_letters_by_function ON dead_letters (function, id);
CREATE INDEX IF NOT EXISTS dead_letters_by_request ON dead_letters (request_id);
"""

INSERT = ("INSERT INTO dead_letters (request_id, function, event, source, condition, attempts, "
          "errors, enqueued_at, failed_at, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
COLUMNS = ("id, request_id, function, event, source, condition, attempts, errors, enqueued_at, "
           "failed_at, record")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    request_id: str
    function: str
    event_json: str
    source: str
    condition: str
    attempts: int
    errors: tuple[dict[str, Any], ...]
    enqueued_at: float
    failed_at: float
    record: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> DeadLetter:
        event = row[3]
        return cls(
            id=row[0], request_id=row[1], function=row[2],
            event_json=event.decode("utf-8", "replace") if isinstance(event, bytes) else event,
            source=row[4], condition=row[5], attempts=row[6],
            errors=tuple(json.loads(row[7] or "[]")), enqueued_at=row[8], failed_at=row[9],
            record=json.loads(row[10]) if row[10] else None,
        )

    @property
    def last_error(self) -> dict[str, Any] | None:
        return self.errors[-1] if self.errors else None

    def to_dict(self) -> dict[str, Any]:
        try:
            event: Any = json.loads(self.event_json)
        except ValueError:
            event = self.event_json
        return {
            "id": self.id, "requestId": self.request_id, "function": self.function,
            "source": self.source, "condition": self.condition, "attempts": self.attempts,
            "enqueuedAt": iso(self.enqueued_at), "failedAt": iso(self.failed_at),
            "event": event, "errors": list(self.errors), "record": self.record,
        }


def iso(timestamp: float) -> str:
    """ISO 8601 in UTC with milliseconds, as Lambda writes timestamps."""
    millis = int(round(timestamp * 1000)) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + f".{millis:03d}Z"


# ------------------------------------------------------------------------- store


def add(db: sqlite3.Connection, *, request_id: str, function: str, event_json: str | bytes,
        source: str, condition: str, attempts: int, errors: Iterable[dict[str, Any]],
        enqueued_at: float, failed_at: float, record: dict[str, Any] | None) -> int:
    """Insert one dead letter (inside the caller's transaction); returns its id."""
    cursor = db.execute(INSERT, (request_id, function, event_json, source, condition, attempts,
                                 json.dumps(list(errors)), enqueued_at, failed_at,
                                 json.dumps(record) if record is not None else None))
    return int(cursor.lastrowid or 0)


def letters(db: sqlite3.Connection, function: str | None = None,
            limit: int | None = None) -> list[DeadLetter]:
    sql = f"SELECT {COLUMNS} FROM dead_letters"
    params: list[Any] = []
    if function is not None:
        sql += " WHERE function = ?"
        params.append(function)
    sql += " ORDER BY id"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return [DeadLetter.from_row(row) for row in db.execute(sql, params)]


def find(db: sqlite3.Connection, ident: str) -> DeadLetter | None:
    """A dead letter by its numeric id or by its request id (the latest one)."""
    if ident.isdigit():
        row = db.execute(f"SELECT {COLUMNS} FROM dead_letters WHERE id = ?",
                         (int(ident),)).fetchone()
    else:
        row = db.execute(f"SELECT {COLUMNS} FROM dead_letters WHERE request_id = ? "
                         "ORDER BY id DESC LIMIT 1", (ident,)).fetchone()
    return DeadLetter.from_row(row) if row else None


def counts(db: sqlite3.Connection) -> dict[str, int]:
    return dict(db.execute("SELECT function, count(*) FROM dead_letters GROUP BY function"))


def redrive(db: sqlite3.Connection, selected: Iterable[DeadLetter], now: float) -> int:
    """Move dead letters back into the queue (one transaction): same request id, new age.

    Earlier errors stay with the invocation, so a letter that fails again lists them all.
    """
    moved = 0
    db.execute("BEGIN IMMEDIATE")
    try:
        for letter in selected:
            db.execute(
                "INSERT INTO queue (request_id, function, event, source, attempts, enqueued_at, "
                "next_attempt_at, status, errors) VALUES (?, ?, ?, ?, 0, ?, ?, 'new', ?)",
                (letter.request_id, letter.function, letter.event_json, letter.source, now, now,
                 json.dumps([*letter.errors, {"kind": "redrive", "at": iso(now),
                                              "deadLetterId": letter.id}])))
            db.execute("DELETE FROM dead_letters WHERE id = ?", (letter.id,))
            moved += 1
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return moved


def purge(db: sqlite3.Connection, function: str | None = None) -> int:
    if function is None:
        cursor = db.execute("DELETE FROM dead_letters")
    else:
        cursor = db.execute("DELETE FROM dead_letters WHERE function = ?", (function,))
    return cursor.rowcount


# ------------------------------------------------------------------------- CLI


def add_commands(parser: argparse.ArgumentParser) -> None:
    """The ``flowrun dlq`` subcommands, added under ``parser``."""
    sub = parser.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        # also after the action (flowrun dlq list -c x.yaml); SUPPRESS keeps an earlier -c
        p.add_argument("-c", "--config", default=argparse.SUPPRESS,
                       help="config file (default ./flowrun.yaml)")
        return p

    p = action("list", "dead letters, oldest first")
    p.add_argument("function", nargs="?", help="only this function")
    p.add_argument("--json", action="store_true", help="print JSON lines")
    p.set_defaults(func=cmd_list)
    p = action("show", "one dead letter: event, every attempt's error, timestamps")
    p.add_argument("ident", metavar="ID", help="dead-letter id or request id")
    p.set_defaults(func=cmd_show)
    p = action("redrive", "queue dead letters again (all, one function's, or one)")
    p.add_argument("target", nargs="?", metavar="FUNCTION|ID")
    p.set_defaults(func=cmd_redrive)
    p = action("purge", "delete dead letters")
    p.add_argument("--function", dest="only", help="only this function's")
    p.set_defaults(func=cmd_purge)


def _open(args: argparse.Namespace) -> tuple[Any, contextlib.closing[sqlite3.Connection]]:
    from flowrun import config as config_module

    config = config_module.load(str(args.config or config_module.DEFAULT_CONFIG_NAME))
    return config, contextlib.closing(open_store(config.state_dir))


def _summary(letter: DeadLetter) -> str:
    error = letter.last_error or {}
    what = f"{error.get('errorType') or ''}: {error.get('errorMessage') or ''}".strip(": ")
    return (f"{letter.id:>6}  {iso(letter.failed_at)}  {letter.function:<16} "
            f"{letter.condition:<17} attempts={letter.attempts}  {letter.request_id}  {what}")


def cmd_list(args: argparse.Namespace) -> int:
    _, store = _open(args)
    with store as db:
        found = letters(db, args.function)
    if args.json:
        for letter in found:
            print(json.dumps(letter.to_dict()))
        return 0
    if not found:
        print("flowrun dlq: no dead letters" + (f" for {args.function}" if args.function else ""))
        return 0
    print(f"{'id':>6}  {'failed at':<24}  {'function':<16} {'condition':<17} attempts  "
          "request id  last error")
    for letter in found:
        print(_summary(letter))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    _, store = _open(args)
    with store as db:
        letter = find(db, args.ident)
    if letter is None:
        print(f"flowrun dlq: no dead letter {args.ident!r}", file=sys.stderr)
        return 1
    print(json.dumps(letter.to_dict(), indent=2))
    return 0


def cmd_redrive(args: argparse.Namespace) -> int:
    config, store = _open(args)
    with store as db:
        target = args.target
        if target is None:
            selected = letters(db)
        elif target in config.functions:
            selected = letters(db, target)
        else:
            letter = find(db, target)
            if letter is None:
                print(f"flowrun dlq: {target!r} is neither a function nor a dead letter; "
                      f"functions: {', '.join(sorted(config.functions)) or 'none'}",
                      file=sys.stderr)
                return 1
            selected = [letter]
        unknown = sorted({s.function for s in selected} - set(config.functions))
        if unknown:
            print(f"flowrun dlq: skipping letters of functions no longer defined: "
                  f"{', '.join(unknown)}", file=sys.stderr)
            selected = [s for s in selected if s.function in config.functions]
        moved = redrive(db, selected, time.time())
    print(f"flowrun dlq: {moved} dead letter{'s' if moved != 1 else ''} queued again")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    _, store = _open(args)
    with store as db:
        removed = purge(db, args.only)
    print(f"flowrun dlq: {removed} dead letter{'s' if removed != 1 else ''} purged")
    return 0


def open_store(state_dir: Path) -> sqlite3.Connection:
    """A connection to ``state_dir``'s queue database (tables created if missing)."""
    from flowrun import queue

    return queue.connect(state_dir / queue.DB_NAME)
