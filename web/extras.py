"""The optional parts of the install (pyproject's extras): a command that needs one that is not installed says which
extra and how to add it, in one line, instead of ending in ModuleNotFoundError."""

from __future__ import annotations

import sys

EXIT_MISSING_EXTRA = 2

# Top-level modules that only an extra brings, by extra (pyproject.toml's [project.optional-dependencies]).
MODULES = {
    "psycopg": "central", "psycopg_pool": "central", "psycopg_binary": "central",
    "gunicorn": "central", "uvicorn_worker": "central", "uvloop": "central", "httptools": "central",
    "sklearn": "train", "onnx": "train", "scipy": "train", "google": "train",
}


def extra_for(error: ModuleNotFoundError) -> str | None:
    """The extra that brings the missing module, or None when it belongs to no extra (a broken install, a bug)."""
    return MODULES.get((error.name or "").partition(".")[0])


def missing_extra(command: str, error: ModuleNotFoundError) -> int:
    """Print what to install for `command` on stderr and return the exit code; re-raise what no extra provides."""
    extra = extra_for(error)
    if extra is None:
        raise error
    print(f"{command} needs the {extra} extra, which is not installed ({error.name} is missing): "
          f"{sys.executable} -m pip install 'pdm-edge[{extra}]'", file=sys.stderr)
    return EXIT_MISSING_EXTRA
