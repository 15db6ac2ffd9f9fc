"""Configuration: the YAML contract users write, validated into frozen pydantic models.

Loading keeps ruamel.yaml's line numbers so that every error names the file, the line and
the key path, and says what would be valid. YAML 1.2 rules apply (``no``/``on``/``off`` are
strings) and a duplicate key is an error. ``${VAR}`` and ``${VAR:-default}`` are expanded
from the environment in every string value.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from triggers import registry
from triggers.base import TriggerConfig

HANDLER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$"
LISTEN_PATTERN = r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):[0-9]{1,5}$"
DEFAULT_CONFIG_NAME = "flowrun.yaml"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApiConfig(_Model):
    listen: str = Field("127.0.0.1:9000", pattern=LISTEN_PATTERN, description="host:port")


class HttpConfig(_Model):
    listen: str = Field("127.0.0.1:8080", pattern=LISTEN_PATTERN, description="host:port")
    max_body_mb: float = Field(6, gt=0, le=64)


class BillingConfig(_Model):
    granularity_ms: int = Field(1, ge=1, le=60_000, description="billed duration rounds up to this")
    price_per_gb_second: float = Field(0.0000166667, ge=0)
    price_per_million_requests: float = Field(0.20, ge=0)


class Permissions(_Model):
    network: Literal["none", "loopback", "full"] = "full"
    user: str | None = Field(None, description="user the worker runs as (root daemons only)")


Destination = Annotated[
    str,
    Field(
        description="function:NAME, folder:PATH, dlq, kafka:TOPIC or mqtt:TOPIC",
        pattern=r"^(function:[A-Za-z0-9_\-]+|folder:.+|dlq|kafka:.+|mqtt:.+)$",
    ),
]


class FunctionConfig(_Model):
    handler: str = Field(pattern=HANDLER_PATTERN, description="module.function under `code`")
    code: Path = Field(Path("."), description="folder holding the handler's module")
    description: str = ""
    memory_mb: int = Field(128, ge=128, le=10_240)
    timeout_s: float = Field(3, gt=0, le=900)
    concurrency: int = Field(10, ge=1, le=1000, description="most invocations at once")
    queue_size: int = Field(100, ge=0, description="invocations waiting past concurrency")
    environment: dict[str, str] = Field(default_factory=dict)
    python: str | None = Field(None, description="interpreter for the workers")
    idle_timeout_s: float = Field(600, gt=0, description="a warm worker unused this long stops")
    spin_us: int = Field(100, ge=0, le=10_000,
                         description="a warm worker polls this long for the next event "
                                     "before sleeping (latency for CPU); 0 turns it off")
    cpus: float | None = Field(None, gt=0, le=64, description="CPU quota; default follows memory")
    pids_max: int = Field(256, ge=8, le=65_536)
    ephemeral_storage_mb: int = Field(512, ge=1, le=10_240)
    permissions: Permissions = Permissions()
    retries: int = Field(2, ge=0, le=2, description="asynchronous retries after a function error")
    max_event_age_s: float = Field(21_600, ge=60, le=21_600)
    async_queue_size: int = Field(100_000, ge=1)
    on_success: Destination | list[Destination] | None = None
    on_failure: Destination | list[Destination] | None = None

    @field_validator("environment", mode="before")
    @classmethod
    def _stringify(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}
        return value


FUNCTION_KEYS = set(FunctionConfig.model_fields) - {"handler"}


class Config(_Model):
    state_dir: Path = Field(Path(".flowrun"), description="ledger, logs and queues")
    api: ApiConfig | None = None
    http: HttpConfig = HttpConfig()
    billing: BillingConfig = BillingConfig()
    shutdown_grace_s: float = Field(30, ge=0, le=3600)
    defaults: dict[str, Any] = Field(default_factory=dict)
    functions: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")], FunctionConfig] = {}
    triggers: list[TriggerConfig] = []
    source: Path | None = Field(None, exclude=True, description="the file this came from")

    def function(self, name: str) -> FunctionConfig:
        return self.functions[name]


@dataclass(frozen=True)
class ConfigIssue:
    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(ValueError):
    """One or more problems in a configuration; ``str()`` lists one per line."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


# --------------------------------------------------------------------------- loading


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


def expand(text: str, environ: Mapping[str, str]) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}``; KeyError names an unset variable."""

    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = environ.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise KeyError(name)
            return default
        return value

    return _VAR.sub(sub, text)


def _expand_tree(node: Any, environ: Mapping[str, str], file: str, path: tuple[Any, ...],
                 issues: list[ConfigIssue], root: Any) -> Any:
    if isinstance(node, dict):
        for key in list(node):
            node[key] = _expand_tree(node[key], environ, file, (*path, key), issues, root)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            node[i] = _expand_tree(item, environ, file, (*path, i), issues, root)
    elif isinstance(node, str) and "${" in node:
        try:
            return expand(node, environ)
        except KeyError as exc:
            issues.append(ConfigIssue(file, line_of(root, path), _dotted(path),
                                      f"environment variable {exc.args[0]} is not set; "
                                      f"set it or write ${{{exc.args[0]}:-default}}"))
    return node


def line_of(root: Any, path: tuple[Any, ...]) -> int | None:
    """1-based line of the deepest node along ``path`` that the YAML tree knows."""
    line: int | None = None
    node = root
    for key in path:
        try:
            if isinstance(node, CommentedMap) and key in node:
                line = node.lc.key(key)[0] + 1
            elif isinstance(node, CommentedSeq) and isinstance(key, int) and key < len(node):
                line = node.lc.item(key)[0] + 1
            else:
                break
            node = node[key]
        except (KeyError, IndexError, TypeError, AttributeError):
            break
    return line


def _dotted(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_UNITS = {"_mb": " of MB", "_ms": " of milliseconds", "_s": " of seconds"}


def _unit(field: str) -> str:
    for suffix, unit in _UNITS.items():
        if field.endswith(suffix):
            return unit
    return ""


def _describe(err: Mapping[str, Any], model: type[BaseModel] | None) -> str:
    kind, loc = err["type"], err["loc"]
    field = str(loc[-1]) if loc else ""
    got = err.get("input")
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"expected a whole number{_unit(field)}, got {got!r}"
    if kind in ("float_parsing", "float_type"):
        return f"expected a number{_unit(field)}, got {got!r}"
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        valid = sorted(model.model_fields) if model is not None and len(loc) == 1 else None
        hint = f"; valid keys: {', '.join(valid)}" if valid else ""
        return f"unknown key{hint}"
    if kind == "string_pattern_mismatch" and field == "handler":
        return f"expected module.function (like app.handler), got {got!r}"
    ctx = err.get("ctx") or {}
    msg = str(err["msg"])
    if kind.startswith(("greater", "less")):
        return f"{msg[0].lower()}{msg[1:]}{_unit(field)}, got {got!r}"
    if "expected" in ctx:
        return f"expected {ctx['expected']}, got {got!r}"
    return f"{msg[0].lower()}{msg[1:]}, got {got!r}" if got is not None else msg


def _issues_from(exc: ValidationError, file: str, root: Any, prefix: tuple[Any, ...],
                 model: type[BaseModel] | None) -> list[ConfigIssue]:
    issues = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path = (*prefix, *loc)
        issues.append(ConfigIssue(file, line_of(root, path), _dotted(path), _describe(err, model)))
    return issues


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _with_defaults(raw: dict[str, Any], file: str, root: Any, issues: list[ConfigIssue]) -> None:
    """Fold ``defaults`` into every function that does not set the key itself."""
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        issues.append(ConfigIssue(file, line_of(root, ("defaults",)), "defaults",
                                  "expected a mapping of function keys"))
        raw["defaults"] = {}
        return
    for key in defaults:
        if key not in FUNCTION_KEYS:
            issues.append(ConfigIssue(file, line_of(root, ("defaults", key)), f"defaults.{key}",
                                      f"unknown key; valid keys: {', '.join(sorted(FUNCTION_KEYS))}"))
    functions = raw.get("functions") or {}
    if isinstance(functions, dict):
        for fn in functions.values():
            if isinstance(fn, dict):
                for key, value in defaults.items():
                    if key in FUNCTION_KEYS:
                        fn.setdefault(key, value)


def _resolve_paths(config: Config, base: Path) -> Config:
    functions = {
        name: fn.model_copy(update={"code": (base / fn.code).resolve()})
        for name, fn in config.functions.items()
    }
    return config.model_copy(update={"state_dir": (base / config.state_dir).resolve(),
                                     "functions": functions})


def _triggers(raw_list: Any, file: str, root: Any, functions: Mapping[str, Any],
              issues: list[ConfigIssue]) -> list[TriggerConfig]:
    out: list[TriggerConfig] = []
    if raw_list is None:
        return out
    if not isinstance(raw_list, list):
        issues.append(ConfigIssue(file, line_of(root, ("triggers",)), "triggers",
                                  "expected a list of triggers"))
        return out
    for i, item in enumerate(raw_list):
        where = ("triggers", i)
        if not isinstance(item, dict) or "type" not in item:
            issues.append(ConfigIssue(file, line_of(root, where), _dotted(where),
                                      f"expected a mapping with a type ({', '.join(registry.available())})"))
            continue
        try:
            model = registry.load(str(item["type"])).config_model
        except (LookupError, ImportError) as exc:
            issues.append(ConfigIssue(file, line_of(root, (*where, "type")), f"{_dotted(where)}.type",
                                      str(exc)))
            continue
        try:
            trigger = model.model_validate(_plain(item))
        except ValidationError as exc:
            issues.extend(_issues_from(exc, file, root, where, model))
            continue
        if trigger.function not in functions:
            defined = ", ".join(sorted(functions)) or "none"
            issues.append(ConfigIssue(file, line_of(root, (*where, "function")),
                                      f"{_dotted(where)}.function",
                                      f"no function named {trigger.function!r}; defined: {defined}"))
            continue
        out.append(trigger)
    return out


def parse(text: str, file: str = "<string>", environ: Mapping[str, str] | None = None,
          base_dir: Path | None = None) -> Config:
    """Parse and validate configuration text; raises ConfigError with every issue found."""
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    try:
        root = yaml.load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = (exc.problem or str(exc)).strip()
        if "duplicate key" in str(exc):
            problem = "duplicate key " + (problem.split("duplicate key")[-1].strip() or "")
        raise ConfigError([ConfigIssue(file, line, "", problem)]) from None
    if root is None:
        root = CommentedMap()
    if not isinstance(root, dict):
        raise ConfigError([ConfigIssue(file, 1, "", "expected a mapping at the top level")])
    issues: list[ConfigIssue] = []
    root = _expand_tree(root, os.environ if environ is None else environ, file, (), issues, root)
    raw = _plain(root)
    _with_defaults(raw, file, root, issues)
    raw_triggers = raw.pop("triggers", None)
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        issues.extend(_issues_from(exc, file, root, (), Config))
        functions = raw.get("functions") if isinstance(raw.get("functions"), dict) else {}
        _triggers(raw_triggers, file, root, functions or {}, issues)
        raise ConfigError(issues) from None
    triggers = _triggers(raw_triggers, file, root, config.functions, issues)
    if issues:
        raise ConfigError(issues)
    config = config.model_copy(update={"triggers": triggers})
    return _resolve_paths(config, base_dir or Path.cwd())


def load(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Load a configuration file; relative paths in it are relative to its folder."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([ConfigIssue(str(file), None, "",
                                       "no such file; pass a config path or create flowrun.yaml")]) from None
    except OSError as exc:
        raise ConfigError([ConfigIssue(str(file), None, "", f"cannot read: {exc.strerror}")]) from None
    config = parse(text, str(file), environ, file.resolve().parent)
    return config.model_copy(update={"source": file.resolve()})


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the configuration, with every trigger adapter that imports."""
    models: list[type[TriggerConfig]] = []
    for name in registry.available():
        try:
            models.append(registry.load(name).config_model)
        except (ImportError, LookupError):
            continue
    trigger_union: Any = Union[tuple(models)] if models else TriggerConfig  # noqa: UP007
    schema_model = create_model(
        "FlowrunConfig",
        __base__=Config,
        triggers=(list[trigger_union], []),
    )
    schema = schema_model.model_json_schema()
    schema["properties"].pop("source", None)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "flowrun configuration"
    return schema
