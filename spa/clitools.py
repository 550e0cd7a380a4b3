"""What both command lines share: one-line usage errors with exit status 2,
and the one way a time is written.

Click (under typer) prints usage errors as a framed block; a mature tool says
what is wrong in one line and where to read more.  `run_app` runs a typer app
with click's standalone mode off and turns its exceptions into that line.

Every wall-clock time either program prints or stores as text (events,
clients, status, doctor, log lines, the dashboard, the config's enroll_by)
is `format_utc`'s: ISO 8601 in UTC with a Z, e.g. 2026-12-06T00:14:18Z.
Durations are written as they are (4m09s, 30 s).
"""

from __future__ import annotations

import calendar
import importlib
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import NoReturn

import typer

from spa import completion

UTC_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # ISO 8601, UTC, whole seconds: fixed width (20)


def format_utc(when: float) -> str:
    """A Unix time as every program writes it: 2026-12-06T00:14:18Z."""
    return time.strftime(UTC_FORMAT, time.gmtime(when))


def parse_utc(text: str) -> float:
    """Unix time of a `format_utc` string.  Raises ValueError."""
    return calendar.timegm(time.strptime(text, UTC_FORMAT))


def _click_exceptions() -> ModuleType:
    """Click's exception classes: typer >= 0.2x vendors click as typer._click."""
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("neither typer._click nor click is importable")


click = _click_exceptions()
_ABORT: tuple[type[BaseException], ...] = tuple({typer.Abort, getattr(click, "Abort", typer.Abort)})


def run_app(app: typer.Typer, program: str) -> None:
    """Run `app`; exit with its status.  Usage errors: one line, status 2."""
    completion.register_if_asked(program)  # a TAB in bash or zsh (spa.completion)
    try:
        code = app(standalone_mode=False, prog_name=program)
    except click.UsageError as exc:
        if not exc.format_message():  # no arguments at all: the help was shown
            sys.exit(0)
        where = exc.ctx.command_path if exc.ctx is not None else program
        sys.stderr.write(f"{program}: error: {exc.format_message()} "
                         f"(see: {where} --help)\n")
        sys.exit(2)
    except click.ClickException as exc:
        sys.stderr.write(f"{program}: error: {exc.format_message()}\n")
        sys.exit(2)
    except _ABORT:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def fail(program: str, message: str) -> NoReturn:
    """One line on stderr, exit status 2."""
    typer.echo(f"{program}: error: {message}", err=True)
    raise typer.Exit(2)


@contextmanager
def local_errors(program: str, *kinds: type[Exception]) -> Iterator[None]:
    """Turn the given local errors into one line and exit status 2, and
    Ctrl-C into "interrupted" and 130, never a traceback."""
    try:
        yield
    except kinds as exc:
        fail(program, str(exc))
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
