"""Where the example functions write: paths relative to the config's folder.

A worker runs with its ``code`` folder (``LAMBDA_TASK_ROOT``) as the working directory.
The example's ``code`` is ``functions/`` next to ``flowrun.yaml``, so a relative path in
an environment variable (``OUT_DIR: data/outbox``) is taken relative to the config's
folder, the parent of ``LAMBDA_TASK_ROOT``, the way the rest of ``flowrun.yaml`` is.
Absolute paths are used as they are.
"""

import os
from pathlib import Path


def config_dir() -> Path:
    return Path(os.environ.get("LAMBDA_TASK_ROOT", os.getcwd())).resolve().parent


def from_config(value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else config_dir() / path
