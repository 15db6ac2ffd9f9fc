"""Configuration: the YAML contract users write, validated into frozen pydantic models.

Loading keeps ruamel.yaml's line numbers so that every error names the file, the line and
the key path, and says what would be valid. YAML 1.2 rules apply (``no``/``on``/``off`` are
strings) and a duplicate key is an error. ``${VAR}`` and ``${VAR:-default}`` are expanded
from the environment in every string value.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError

from triggers import registry
from triggers.base import TriggerConfig

HANDLER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$"
LISTEN_PATTERN = r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):[0-9]{1,5}$"
DEFAULT_CONFIG_NAME = "flowrun.yaml"
FUNCTION_NAME_PATTERN = r"^[A-Za-z0-9_\-]{1,64}$"
DESTINATION_PATTERN = r"^(function:[A-Za-z0-9_\-]+|folder:.+|dlq|kafka:.+|mqtt:.+)$"


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
        pattern=DESTINATION_PATTERN,
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
    spin_us: int | None = Field(None, ge=0, le=10_000,
                                description="a warm worker polls this long for the next event "
                                            "before sleeping (latency for CPU); 0 turns it off; "
                                            "default 100 for functions with a whole CPU, else 0")
    cpus: float | None = Field(None, gt=0, le=64, description="CPU quota; default follows memory")
    pids_max: int = Field(256, ge=8, le=65_536)
    ephemeral_storage_mb: int = Field(512, ge=1, le=10_240)
    permissions: Permissions = Permissions()
    retries: int = Field(2, ge=0, le=2, description="asynchronous retries after a function error")
    max_event_age_s: float = Field(21_600, ge=60, le=21_600)
    async_queue_size: int = Field(100_000, ge=1)
    retry_backoff_s: list[Annotated[float, Field(ge=0, le=21_600)]] = Field(
        default_factory=lambda: [60.0, 120.0], min_length=1,
        description="wait before each asynchronous retry (the last one repeats)")
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
    functions: dict[Annotated[str, Field(pattern=FUNCTION_NAME_PATTERN)], FunctionConfig] = {}
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
_BOUND_UNITS = {"_mb": " MB", "_ms": " ms", "_us": " µs", "_s": " seconds"}

PATTERN_HINTS = {
    LISTEN_PATTERN: "host:port (like 127.0.0.1:9000)",
    DESTINATION_PATTERN: "function:NAME, folder:PATH, dlq, kafka:TOPIC or mqtt:TOPIC",
    FUNCTION_NAME_PATTERN: "a name of letters, digits, '-' and '_' (at most 64)",
    HANDLER_PATTERN: "module.function (like app.handler)",
}
_KINDS = {"string_type": "a string", "list_type": "a list", "dict_type": "a mapping",
          "model_type": "a mapping", "model_attributes_type": "a mapping",
          "int_type": "a whole number", "int_parsing": "a whole number",
          "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
          "bool_parsing": "true or false", "none_required": "null"}
_BOUNDS = {"greater_than_equal": ("at least", "ge"), "less_than_equal": ("at most", "le"),
           "greater_than": ("more than", "gt"), "less_than": ("less than", "lt")}
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "tuple", "set"}


def _unit(field: str, units: Mapping[str, str] = _UNITS) -> str:
    for suffix, unit in units.items():
        if field.endswith(suffix):
            return unit
    return ""


def _number_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _step(tp: Any, part: Any) -> Any:
    """The type found at ``part`` inside type ``tp`` (a model, dict, list, union), or None."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(str(part))
        return field.annotation if field is not None else None
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return _step(args[0], part)
    if origin in (Union, UnionType):
        for arg in args:
            found = _step(arg, part)
            if found is not None:
                return found
        return None
    if origin is dict and len(args) == 2:
        return args[1]
    if origin is list and args and isinstance(part, int):
        return args[0]
    return None


def _as_model(tp: Any) -> type[BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    if get_origin(tp) in (Union, UnionType, Annotated):
        for arg in get_args(tp):
            model = _as_model(arg)
            if model is not None:
                return model
    return None


def _model_at(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model whose keys the last element of ``loc`` is one of."""
    tp: Any = model
    for part in loc[:-1]:
        tp = _step(tp, part)
        if tp is None:
            return None
    return _as_model(tp)


def valid_keys(model: type[BaseModel]) -> list[str]:
    return sorted(name for name, field in model.model_fields.items() if field.exclude is not True)


def _describe(err: Mapping[str, Any], model: type[BaseModel] | None) -> str:
    kind, loc = err["type"], err["loc"]
    field = next((str(p) for p in reversed(loc) if isinstance(p, str)), "")
    got = err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "value_error" and isinstance(got, Mapping):  # a model validator's own words
        return str(ctx.get("error") or err["msg"])
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"expected a whole number{_unit(field)}, got {got!r}"
    if kind in ("float_parsing", "float_type"):
        return f"expected a number{_unit(field)}, got {got!r}"
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        owner = _model_at(model, loc)
        hint = f"; valid keys: {', '.join(valid_keys(owner))}" if owner is not None else ""
        return f"unknown key{hint}"
    if kind == "string_pattern_mismatch":
        wanted = PATTERN_HINTS.get(str(ctx.get("pattern")))
        if wanted is not None:
            return f"expected {wanted}, got {got!r}"
    if kind in _BOUNDS:
        words, key = _BOUNDS[kind]
        bound = _number_text(ctx.get(key))
        return f"expected {words} {bound}{_unit(field, _BOUND_UNITS)}, got {got!r}"
    if kind in _KINDS:
        return f"expected {_KINDS[kind]}, got {got!r}"
    msg = str(err["msg"])
    if "expected" in ctx:
        return f"expected {ctx['expected']}, got {got!r}"
    return f"{msg[0].lower()}{msg[1:]}, got {got!r}" if got is not None else msg


def _real_loc(loc: tuple[Any, ...], data: Any) -> tuple[tuple[Any, ...], int | None]:
    """``loc`` without pydantic's union-member tags, and where the first tag was (or None).

    A part is a tag when the data has no such key there and it looks like one
    (``constrained-str``, ``list[str]``, ``function-after[...]``, ``[key]``, ``str``).
    """
    out: list[Any] = []
    tag_at: int | None = None
    node = data
    for part in loc:
        present = (isinstance(node, Mapping) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node))
        if present:
            out.append(part)
            node = node[part]
            continue
        if isinstance(part, str) and (any(c in part for c in "[]-") or part in _TYPE_TAGS):
            tag_at = len(out) if tag_at is None else tag_at
            continue
        out.append(part)
        node = None
    return tuple(out), tag_at


def _issues_from(exc: ValidationError, file: str, root: Any, prefix: tuple[Any, ...],
                 model: type[BaseModel] | None) -> list[ConfigIssue]:
    data = root
    for part in prefix:
        data = data[part] if data is not None else None
    unions: dict[tuple[Any, ...], list[tuple[tuple[Any, ...], Mapping[str, Any]]]] = {}
    plain: list[tuple[tuple[Any, ...], Mapping[str, Any]]] = []
    for err in exc.errors():
        loc, tag_at = _real_loc(tuple(err["loc"]), data)
        if tag_at is None:
            plain.append((loc, err))
        else:
            unions.setdefault(loc[:tag_at], []).append((loc, err))
    chosen = list(plain)
    for field_loc, members in unions.items():
        specific = [m for m in members if not str(m[1]["type"]).endswith("_type")]
        if specific:
            chosen.append(max(specific, key=lambda m: len(m[0])))
            continue
        kinds = sorted({_KINDS.get(str(m[1]["type"]), str(m[1]["type"])) for m in members})
        got = members[0][1].get("input")
        chosen.append((field_loc, {"type": "union", "loc": field_loc, "input": got,
                                   "msg": f"expected {' or '.join(kinds)}, got {got!r}"}))
    issues = []
    seen: set[tuple[str, str]] = set()
    for loc, detail in chosen:
        path = _from_defaults(root, (*prefix, *loc))
        message = (str(detail["msg"]) if detail["type"] == "union"
                   else _describe({**detail, "loc": loc}, model))
        if (_dotted(path), message) in seen:
            continue
        seen.add((_dotted(path), message))
        issues.append(ConfigIssue(file, line_of(root, path), _dotted(path), message))
    return issues


def _from_defaults(root: Any, path: tuple[Any, ...]) -> tuple[Any, ...]:
    """Point an error in a value a function inherited from ``defaults`` at ``defaults``."""
    if len(path) < 3 or path[0] != "functions" or not isinstance(root, dict):
        return path
    functions, defaults = root.get("functions"), root.get("defaults")
    if not isinstance(functions, dict) or not isinstance(defaults, dict):
        return path
    own = functions.get(path[1])
    key, rest = path[2], path[3:]
    if not isinstance(own, dict) or key not in defaults:
        return path
    if key not in own:
        return ("defaults", key, *rest)
    inherited = defaults[key]
    if rest and isinstance(own[key], dict) and isinstance(inherited, dict) \
            and rest[0] not in own[key] and rest[0] in inherited:
        return ("defaults", key, *rest)
    return path


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _with_defaults(raw: dict[str, Any], file: str, root: Any, issues: list[ConfigIssue]) -> None:
    """Fold ``defaults`` into every function that does not set the key itself.

    Mappings (``environment``, ``permissions``) are merged key by key, the function's own
    entries winning.
    """
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
                    if key not in FUNCTION_KEYS:
                        continue
                    if isinstance(value, dict) and isinstance(fn.get(key), dict):
                        fn[key] = {**value, **fn[key]}  # environment, permissions: merged
                    else:
                        fn.setdefault(key, value)


def _in_file_order(issues: list[ConfigIssue]) -> list[ConfigIssue]:
    return sorted(issues, key=lambda issue: issue.line or 0)


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
    where_of: dict[int, int] = {}  # position in out -> index in the triggers list
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
        check = getattr(registry.load(str(item["type"])), "check", None)  # needs the function too
        if check is not None and isinstance(functions[trigger.function], FunctionConfig):
            issues.extend(ConfigIssue(file, line_of(root, where), _dotted(where), message)
                          for message in check(trigger, functions[trigger.function]))
        where_of[len(out)] = i
        out.append(trigger)
    issues.extend(_checked_together(out, where_of, file, root))
    return out


def _checked_together(triggers: list[TriggerConfig], where_of: Mapping[int, int], file: str,
                      root: Any) -> list[ConfigIssue]:
    """Problems between triggers of one type (two http triggers on one route), from the
    adapter's ``check_together(configs) -> [(position, message)]`` when it has one."""
    issues = []
    classes = [registry.load(t.type) for t in triggers]  # "http" and its module:Class are one
    for cls in dict.fromkeys(classes):
        check = getattr(cls, "check_together", None)
        if check is None:
            continue
        positions = [n for n, c in enumerate(classes) if c is cls]
        for position, message in check([triggers[n] for n in positions]):
            where = ("triggers", where_of[positions[position]])
            issues.append(ConfigIssue(file, line_of(root, where), _dotted(where), message))
    return issues


_DUPLICATE = re.compile(r'found duplicate key "(.*?)" with value')


def _find_mapping(node: Any, line: int, column: int, path: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Key path of the mapping that starts at ``line``/``column`` (0-based) in a YAML tree."""
    if isinstance(node, CommentedMap):
        if (node.lc.line, node.lc.col) == (line, column):
            return path
        items: Any = node.items()
    elif isinstance(node, CommentedSeq):
        items = enumerate(node)
    else:
        return None
    for key, value in items:
        found = _find_mapping(value, line, column, (*path, key))
        if found is not None:
            return found
    return None


def _duplicate_key_issue(exc: DuplicateKeyError, text: str, file: str) -> ConfigIssue:
    """Name the duplicated key's path, its line and the line it was first defined on."""
    mark, context = exc.problem_mark, exc.context_mark
    line = mark.line + 1 if mark is not None else None
    match = _DUPLICATE.search(exc.problem or "")
    key = match.group(1) if match else "?"
    path: tuple[Any, ...] = (key,)
    first = ""
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = True
    try:
        tree = yaml.load(text)
        found = _find_mapping(tree, context.line, context.column, ()) if context else None
    except Exception:  # the duplicate was the first problem; others are reported next time
        found = None
    if found is not None:
        path = (*found, key)
        mapping = tree
        for part in found:
            mapping = mapping[part]
        if key in mapping:
            first = f" (first on line {mapping.lc.key(key)[0] + 1})"
    return ConfigIssue(file, line, _dotted(path),
                       f"duplicate key; a key may appear only once in a mapping{first}")


def _destination_issues(config: Config, file: str, root: Any) -> list[ConfigIssue]:
    """``function:NAME`` destinations must name a defined function."""
    issues = []
    for name, fn in config.functions.items():
        for key in ("on_success", "on_failure"):
            value = getattr(fn, key)
            for i, target in enumerate([value] if isinstance(value, str) else value or []):
                if target.startswith("function:") and target[9:] not in config.functions:
                    path = ("functions", name, key) + (() if isinstance(value, str) else (i,))
                    issues.append(ConfigIssue(
                        file, line_of(root, path), _dotted(path),
                        f"no function named {target[9:]!r}; defined: "
                        f"{', '.join(sorted(config.functions))}"))
    return issues


def parse(text: str, file: str = "<string>", environ: Mapping[str, str] | None = None,
          base_dir: Path | None = None) -> Config:
    """Parse and validate configuration text; raises ConfigError with every issue found."""
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    try:
        root = yaml.load(text)
    except DuplicateKeyError as exc:
        raise ConfigError([_duplicate_key_issue(exc, text, file)]) from None
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = (exc.problem or str(exc)).strip()
        if exc.context and exc.problem:
            problem = f"{problem} ({exc.context.strip()})"
        raise ConfigError([ConfigIssue(file, line, "", f"invalid YAML: {problem}")]) from None
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
        raise ConfigError(_in_file_order(issues)) from None
    triggers = _triggers(raw_triggers, file, root, config.functions, issues)
    issues.extend(_destination_issues(config, file, root))
    if issues:
        raise ConfigError(_in_file_order(issues))
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


def _module_found(code: Path, module: str) -> bool:
    base = code.joinpath(*module.split("."))
    if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
        return True
    import importlib.util

    try:  # an installed package (a layer, in Lambda's words)
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def code_issues(config: Config) -> list[ConfigIssue]:
    """Functions whose ``code`` folder or handler module does not exist (``flowrun validate``).

    Not part of loading: an embedding app may write its code after building its config.
    """
    file = str(config.source) if config.source else "<config>"
    root: Any = None
    if config.source is not None:
        with contextlib.suppress(Exception):
            root = YAML(typ="rt").load(config.source.read_text(encoding="utf-8"))
    issues = []
    for name, fn in config.functions.items():
        module = fn.handler.rpartition(".")[0]
        if not fn.code.is_dir():
            path: tuple[Any, ...] = ("functions", name, "code")
            message = f"no such folder {str(fn.code)!r}; `code` is relative to the config's folder"
        elif not _module_found(fn.code, module):
            path = ("functions", name, "handler")
            message = (f"no module {module!r} in {str(fn.code)!r} (looked for "
                       f"{module.replace('.', '/')}.py) nor installed")
        else:
            continue
        path = _from_defaults(root, path) if root is not None else path
        issues.append(ConfigIssue(file, line_of(root, path) if root is not None else None,
                                  _dotted(path), message))
    return issues


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the configuration, with every trigger adapter that imports.

    Each adapter's definition pins ``type`` to the adapter's name, so an editor picks the
    right set of keys for each ``triggers:`` item.
    """
    models: list[type[TriggerConfig]] = []
    names: dict[str, str] = {}
    for name in registry.available():
        try:
            model = registry.load(name).config_model
        except (ImportError, LookupError):
            continue
        if model not in models:
            models.append(model)
            names[model.__name__] = name
    trigger_union: Any = Union[tuple(models)] if models else TriggerConfig  # noqa: UP007
    schema_model = create_model(
        "FlowrunConfig",
        __base__=Config,
        triggers=(list[trigger_union], []),
    )
    schema = schema_model.model_json_schema()
    schema["properties"].pop("source", None)
    for title, name in names.items():
        properties = schema.get("$defs", {}).get(title, {}).get("properties", {})
        if "type" in properties:
            properties["type"] = {**properties["type"], "const": name}
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "flowrun configuration"
    return schema
