"""What every ``hangar`` command prints through, and how it turns API errors into exits."""

from __future__ import annotations

from typing import Any, NoReturn

import typer
from rich.console import Console

from hangar.cli.client import ApiError

console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 1) -> NoReturn:
    errors.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def call(function: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return function(*args, **kwargs)
    except ApiError as exc:
        fail(f"{exc.message} ({exc.status_code} {exc.code})")
    except OSError as exc:
        fail(f"cannot reach the hangar API: {exc}")
