"""Configuration: YAML 1.2, expansion, and errors that name file, line, key path and a fix."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import Field
from ruamel.yaml import YAML

from flowrun import config as config_module
from flowrun.config import Config, ConfigError, ConfigIssue
from triggers.base import Trigger, TriggerConfig


class SampleTriggerConfig(TriggerConfig):
    """A trigger with keys of its own, to test how trigger items are validated."""

    every_s: float = Field(gt=0)
    folder: str = "."


class SampleTrigger(Trigger):
    config_model = SampleTriggerConfig

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


SAMPLE = f"{__name__}:SampleTrigger"


def parse(text: str, environ: dict[str, str] | None = None, base_dir: Path | None = None) -> Config:
    return config_module.parse(textwrap.dedent(text), "flowrun.yaml", environ or {}, base_dir)


def issues_of(text: str, environ: dict[str, str] | None = None) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as caught:
        parse(text, environ)
    return caught.value.issues


def lines_of(text: str, environ: dict[str, str] | None = None) -> list[str]:
    return [str(issue) for issue in issues_of(text, environ)]


# --------------------------------------------------------------------------- YAML 1.2


def test_no_on_and_off_stay_strings_in_environment_values() -> None:
    config = parse("""
        functions:
          app:
            handler: app.handler
            environment: {A: no, B: on, C: off, D: yes, E: 1.50, F: true}
    """)
    assert config.functions["app"].environment == {
        "A": "no", "B": "on", "C": "off", "D": "yes", "E": "1.5", "F": "true"}


def test_a_duplicate_key_is_an_error_naming_its_path_and_both_lines() -> None:
    lines = lines_of("""
        functions:
          app:
            handler: app.handler
            memory_mb: 256
            memory_mb: 512
    """)
    assert lines == ["flowrun.yaml:6: functions.app.memory_mb: duplicate key; "
                     "a key may appear only once in a mapping (first on line 5)"]


def test_a_duplicate_function_name_is_an_error() -> None:
    (issue,) = issues_of("""
        functions:
          app: {handler: app.handler}
          app: {handler: app.other}
    """)
    assert (issue.line, issue.path) == (4, "functions.app")
    assert "duplicate key" in issue.message and "first on line 3" in issue.message


def test_broken_yaml_is_reported_with_its_line() -> None:
    (issue,) = issues_of("""
        functions:
          app: {handler: app.handler
    """)
    assert issue.line is not None and issue.line >= 3
    assert issue.message.startswith("invalid YAML:")


# --------------------------------------------------------------------------- expansion


def test_variables_are_expanded_from_the_environment_with_defaults() -> None:
    config = parse("""
        state_dir: ${STATE:-state}
        functions:
          app:
            handler: app.handler
            memory_mb: ${MEMORY_MB:-256}
            environment:
              URL: http://${HOST}:${PORT:-80}/x
              EMPTY_FALLS_BACK: ${EMPTY:-fallback}
              EMPTY_KEPT: ${EMPTY}
    """, {"HOST": "edge.local", "MEMORY_MB": "512", "EMPTY": ""}, base_dir=Path("/srv"))
    app = config.functions["app"]
    assert app.memory_mb == 512
    assert app.environment == {"URL": "http://edge.local:80/x", "EMPTY_FALLS_BACK": "fallback",
                               "EMPTY_KEPT": ""}
    assert config.state_dir == Path("/srv/state")


def test_an_unset_variable_without_default_is_an_error_that_says_how_to_fix_it() -> None:
    lines = lines_of("""
        functions:
          app:
            handler: app.handler
            environment:
              TOKEN: ${API_TOKEN}
    """)
    assert lines == ["flowrun.yaml:6: functions.app.environment.TOKEN: environment variable "
                     "API_TOKEN is not set; set it or write ${API_TOKEN:-default}"]


# --------------------------------------------------------------------------- error messages


def test_a_wrong_type_names_file_line_key_path_and_what_is_expected() -> None:
    lines = lines_of("""
        functions:
          summarize:
            handler: summarize.handler
            memory_mb: lots
            timeout_s: soon
    """)
    assert lines == [
        "flowrun.yaml:5: functions.summarize.memory_mb: expected a whole number of MB, got 'lots'",
        "flowrun.yaml:6: functions.summarize.timeout_s: expected a number of seconds, got 'soon'",
    ]


def test_out_of_range_values_say_the_bound() -> None:
    lines = lines_of("""
        functions:
          app: {handler: app.handler, memory_mb: 64, concurrency: 0, timeout_s: 901}
    """)
    assert lines == [
        "flowrun.yaml:3: functions.app.memory_mb: expected at least 128 MB, got 64",
        "flowrun.yaml:3: functions.app.timeout_s: expected at most 900 seconds, got 901",
        "flowrun.yaml:3: functions.app.concurrency: expected at least 1, got 0",
    ]


def test_unknown_keys_list_the_valid_ones_at_every_level() -> None:
    issues = issues_of("""
        statedir: x
        functions:
          app:
            handler: app.handler
            memory: 256
            permissions: {network: none, sudo: true}
    """)
    by_path = {issue.path: issue for issue in issues}
    assert by_path["statedir"].line == 2
    assert by_path["statedir"].message == (
        "unknown key; valid keys: api, billing, defaults, functions, http, shutdown_grace_s, "
        "state_dir, triggers")
    assert by_path["functions.app.memory"].line == 6
    assert "valid keys: " in by_path["functions.app.memory"].message
    assert "memory_mb" in by_path["functions.app.memory"].message
    assert by_path["functions.app.permissions.sudo"].message == (
        "unknown key; valid keys: network, user")


def test_a_missing_handler_and_a_malformed_one_are_reported() -> None:
    lines = lines_of("""
        functions:
          a: {memory_mb: 256}
          b: {handler: nodot}
    """)
    assert lines == [
        "flowrun.yaml:3: functions.a.handler: required key is missing",
        "flowrun.yaml:4: functions.b.handler: expected module.function (like app.handler), "
        "got 'nodot'",
    ]


def test_a_bad_choice_lists_the_choices() -> None:
    (line,) = lines_of("""
        functions:
          app: {handler: app.handler, permissions: {network: some}}
    """)
    assert line == ("flowrun.yaml:3: functions.app.permissions.network: "
                    "expected 'none', 'loopback' or 'full', got 'some'")


def test_a_destination_error_is_one_message_naming_the_valid_forms() -> None:
    lines = lines_of("""
        functions:
          app:
            handler: app.handler
            on_success: nowhere
            on_failure: [dlq, "bin"]
    """)
    valid = "function:NAME, folder:PATH, dlq, kafka:TOPIC or mqtt:TOPIC"
    assert lines == [
        f"flowrun.yaml:5: functions.app.on_success: expected {valid}, got 'nowhere'",
        f"flowrun.yaml:6: functions.app.on_failure[1]: expected {valid}, got 'bin'",
    ]


def test_listen_addresses_and_function_names_say_what_they_should_look_like() -> None:
    lines = lines_of("""
        api: {listen: "port 9000"}
        functions:
          "my app": {handler: app.handler}
    """)
    assert lines == [
        "flowrun.yaml:2: api.listen: expected host:port (like 127.0.0.1:9000), got 'port 9000'",
        "flowrun.yaml:4: functions.my app: expected a name of letters, digits, '-' and '_' "
        "(at most 64), got 'my app'",
    ]


def test_several_errors_are_reported_at_once_in_file_order() -> None:
    issues = issues_of(f"""
        functions:
          a: {{handler: a.handler, memory_mb: lots}}
          b: {{handler: b.handler, timeout_s: -1}}
        triggers:
          - {{type: {SAMPLE}, function: c, every_s: 1}}
        bogus: 1
    """)
    assert [(i.line, i.path) for i in issues] == [
        (3, "functions.a.memory_mb"), (4, "functions.b.timeout_s"),
        (6, "triggers[0].function"), (7, "bogus")]


def test_a_config_that_is_not_a_mapping_is_an_error() -> None:
    assert lines_of("- just\n- a list\n") == ["flowrun.yaml:1: expected a mapping at the top level"]


def test_a_missing_file_says_so() -> None:
    with pytest.raises(ConfigError) as caught:
        config_module.load("/nonexistent/flowrun.yaml")
    assert str(caught.value) == ("/nonexistent/flowrun.yaml: no such file; pass a config path "
                                 "or create flowrun.yaml")


# --------------------------------------------------------------------------- defaults


def test_defaults_apply_to_every_function_that_does_not_set_the_key() -> None:
    config = parse("""
        defaults:
          memory_mb: 512
          timeout_s: 10
          environment: {STAGE: edge, LEVEL: info}
        functions:
          a: {handler: a.handler}
          b: {handler: b.handler, memory_mb: 1024, environment: {LEVEL: debug}}
    """)
    a, b = config.functions["a"], config.functions["b"]
    assert (a.memory_mb, a.timeout_s, b.memory_mb, b.timeout_s) == (512, 10, 1024, 10)
    assert a.environment == {"STAGE": "edge", "LEVEL": "info"}
    assert b.environment == {"STAGE": "edge", "LEVEL": "debug"}


def test_an_unknown_default_and_a_bad_default_value_are_errors() -> None:
    issues = issues_of("""
        defaults:
          memroy_mb: 512
          timeout_s: never
        functions:
          a: {handler: a.handler}
    """)
    assert issues[0].line == 3 and issues[0].path == "defaults.memroy_mb"
    assert issues[0].message.startswith("unknown key; valid keys: async_queue_size, code, ")
    assert "handler" not in issues[0].message
    assert (issues[1].line, issues[1].path) == (4, "defaults.timeout_s")
    assert "expected a number of seconds, got 'never'" in issues[1].message


# --------------------------------------------------------------------------- triggers


def test_triggers_are_validated_against_their_adapters_model() -> None:
    config = parse(f"""
        functions:
          a: {{handler: a.handler}}
        triggers:
          - type: {SAMPLE}
            function: a
            every_s: 2.5
    """)
    (trigger,) = config.triggers
    assert isinstance(trigger, SampleTriggerConfig)
    assert (trigger.function, trigger.every_s, trigger.enabled) == ("a", 2.5, True)


def test_a_trigger_error_names_the_item_and_the_adapters_valid_keys() -> None:
    lines = lines_of(f"""
        functions:
          a: {{handler: a.handler}}
        triggers:
          - type: {SAMPLE}
            function: a
            every_s: often
            color: red
    """)
    assert lines == [
        "flowrun.yaml:7: triggers[0].every_s: expected a number of seconds, got 'often'",
        "flowrun.yaml:8: triggers[0].color: unknown key; valid keys: enabled, every_s, folder, "
        "function, name, type",
    ]


def test_an_unknown_trigger_type_lists_the_known_ones() -> None:
    (issue,) = issues_of("""
        functions:
          a: {handler: a.handler}
        triggers:
          - type: carrier-pigeon
            function: a
    """)
    assert (issue.line, issue.path) == (5, "triggers[0].type")
    assert issue.message == ("unknown trigger type 'carrier-pigeon'; valid: cron, file, http, "
                             "kafka, mqtt or 'package.module:Class'")


def test_a_trigger_without_a_type_says_which_types_exist() -> None:
    (line,) = lines_of("""
        functions:
          a: {handler: a.handler}
        triggers:
          - function: a
    """)
    assert line == ("flowrun.yaml:5: triggers[0]: expected a mapping with a type "
                    "(cron, file, http, kafka, mqtt)")


def test_a_trigger_naming_an_undefined_function_lists_the_defined_ones() -> None:
    (line,) = lines_of(f"""
        functions:
          summarize: {{handler: s.handler}}
          hello: {{handler: h.handler}}
        triggers:
          - {{type: {SAMPLE}, function: sumarize, every_s: 1}}
    """)
    assert line == ("flowrun.yaml:6: triggers[0].function: no function named 'sumarize'; "
                    "defined: hello, summarize")


def test_a_builtin_trigger_is_validated_by_its_module() -> None:
    config = parse("""
        functions:
          hello: {handler: hello.handler}
        triggers:
          - {type: http, function: hello, method: POST, path: /hello}
    """)
    assert config.triggers[0].type == "http"
    (issue,) = issues_of("""
        functions:
          hello: {handler: hello.handler}
        triggers:
          - {type: http, function: hello, method: POST}
    """)
    assert (issue.line, issue.path, issue.message) == (
        5, "triggers[0].path", "required key is missing")


# --------------------------------------------------------------------------- paths


def test_relative_paths_are_resolved_against_the_configs_folder(tmp_path: Path,
                                                                 monkeypatch: Any) -> None:
    folder = tmp_path / "pipeline"
    folder.mkdir()
    (folder / "flowrun.yaml").write_text(textwrap.dedent("""
        state_dir: state
        functions:
          a: {handler: a.handler, code: functions}
          b: {handler: b.handler, code: /opt/code}
          c: {handler: c.handler}
    """))
    monkeypatch.chdir(tmp_path)
    config = config_module.load("pipeline/flowrun.yaml", environ={})
    assert config.source == folder / "flowrun.yaml"
    assert config.state_dir == folder / "state"
    assert config.functions["a"].code == folder / "functions"
    assert config.functions["b"].code == Path("/opt/code")
    assert config.functions["c"].code == folder


def test_the_example_config_is_valid(monkeypatch: Any) -> None:
    example = Path(__file__).parents[2] / "configs" / "flowrun.yaml"
    config = config_module.load(example, environ={})
    assert sorted(config.functions) == ["heartbeat", "hello", "summarize"]
    assert sorted(t.type for t in config.triggers) == ["cron", "file", "http"]
    assert config.functions["summarize"].code == example.parent / "functions"
    assert config.state_dir == example.parent / ".flowrun"
    assert config.api is not None and config.api.listen == "127.0.0.1:9000"
    assert config.http.listen == "127.0.0.1:8080"


# --------------------------------------------------------------------------- schema


def test_the_schema_is_a_valid_json_schema_with_functions_and_triggers() -> None:
    schema = config_module.json_schema()
    json.dumps(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["type"] == "object"
    assert {"functions", "triggers", "state_dir", "api", "http", "defaults"} <= set(
        schema["properties"])
    assert "source" not in schema["properties"]
    definitions = schema["$defs"]
    function = definitions["FunctionConfig"]
    assert function["required"] == ["handler"]
    assert function["properties"]["memory_mb"]["minimum"] == 128
    assert function["additionalProperties"] is False
    trigger_items = schema["properties"]["triggers"]["items"]
    referenced = {ref["$ref"].rsplit("/", 1)[-1] for ref in trigger_items.get("anyOf", [trigger_items])}
    assert {"FileTriggerConfig", "HttpTriggerConfig", "CronConfig"} <= referenced
    pinned = {definitions[name]["properties"]["type"].get("const") for name in referenced}
    assert {"file", "http", "cron"} <= pinned
    for name in referenced:
        assert "function" in definitions[name]["properties"]
        assert definitions[name]["additionalProperties"] is False


def test_the_schema_accepts_the_example_and_rejects_a_bad_config() -> None:
    schema = config_module.json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    example = Path(__file__).parents[2] / "configs" / "flowrun.yaml"
    document = YAML(typ="safe").load(config_module.expand(example.read_text(), {}))
    assert [e.message for e in validator.iter_errors(document)] == []
    bad = {"functions": {"a": {"handler": "a.handler", "memory_mb": "lots"}}}
    assert list(validator.iter_errors(bad))


def test_an_error_in_an_inherited_default_points_at_the_defaults_line_once(tmp_path) -> None:
    path = tmp_path / "flowrun.yaml"
    path.write_text("defaults:\n  memory_mb: lots\nfunctions:\n  a:\n    handler: m.a\n"
                    "  b:\n    handler: m.b\n")
    with pytest.raises(ConfigError) as caught:
        config_module.load(path)
    assert [str(i) for i in caught.value.issues] == [
        f"{path}:2: defaults.memory_mb: expected a whole number of MB, got 'lots'"]


def test_validate_names_a_missing_code_folder_and_a_missing_handler_module(tmp_path) -> None:
    (tmp_path / "fns").mkdir()
    (tmp_path / "fns" / "real.py").write_text("def handler(event, context):\n    return 1\n")
    path = tmp_path / "flowrun.yaml"
    path.write_text("functions:\n  a:\n    handler: real.handler\n    code: fns\n"
                    "  b:\n    handler: ghost.handler\n    code: fns\n"
                    "  c:\n    handler: real.handler\n    code: nowhere\n")
    issues = config_module.code_issues(config_module.load(path))
    assert [(i.line, i.path) for i in issues] == [(6, "functions.b.handler"),
                                                  (10, "functions.c.code")]
    assert "no module 'ghost'" in issues[0].message
