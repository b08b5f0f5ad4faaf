"""What every ``hangar`` command prints through, and how it turns API errors into exits.

An error is one line on stderr: the API's own sentence and the HTTP status (``error: machine
x not found in app web (HTTP 404 not_found)``), or why the API could not be reached; never a
traceback. ``--json`` prints the API's JSON as it is.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, NoReturn, TypeVar

import httpx
import typer
from rich.console import Console
from rich.markup import escape

from hangar.cli.client import ApiError

console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the API's JSON as it is.")]
AppOption = Annotated[str, typer.Option("--app", "-a", help="The app.")]

Result = TypeVar("Result")


def fail(message: str, code: int = 1) -> NoReturn:
    errors.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)


def api_error_line(exc: ApiError) -> str:
    status = f"HTTP {exc.status_code}" + (f" {exc.code}" if exc.code else "")
    return f"{exc.message or 'the API gave no reason'} ({status})"


def unreachable_line(exc: Exception) -> str:
    return f"cannot reach the hangar API: {exc or type(exc).__name__}"


def call(function: Callable[..., Result], *args: Any, **kwargs: Any) -> Result:
    try:
        return function(*args, **kwargs)
    except ApiError as exc:
        fail(api_error_line(exc))
    except (OSError, httpx.TransportError) as exc:
        fail(unreachable_line(exc))


def print_json(data: Any) -> None:
    """The API's JSON, indented, nothing added (plain text even on a terminal)."""
    typer.echo(json.dumps(data, indent=2))
