"""Shared fixtures: real runtimes with real worker processes, state in a temp folder."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from flowrun import config as config_module
from flowrun.runtime import Runtime

pytest_plugins = ["tests.brokers.mqtt", "tests.brokers.kafka"]

FUNCTIONS = Path(__file__).parent / "functions"


@pytest.fixture
def functions_dir() -> Path:
    return FUNCTIONS


def write_config(tmp_path: Path, yaml_text: str) -> Path:
    """Write a config into ``tmp_path``; ``{functions}`` expands to tests/functions."""
    path = tmp_path / "flowrun.yaml"
    path.write_text(textwrap.dedent(yaml_text).replace("{functions}", str(FUNCTIONS)))
    return path


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[[str], Path]:
    return lambda text: write_config(tmp_path, text)


@pytest.fixture
async def make_runtime(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``await make_runtime(yaml_text)`` → a started Runtime, stopped after the test."""
    started: list[Runtime] = []

    async def factory(yaml_text: str, **kwargs: Any) -> Runtime:
        path = write_config(tmp_path, yaml_text)
        runtime = Runtime(config_module.load(path), **kwargs)
        await runtime.start()
        started.append(runtime)
        return runtime

    yield factory
    for runtime in started:
        await runtime.stop(grace_s=5)
