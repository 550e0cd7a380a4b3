"""Man pages rendered from the command line's own definitions.

`render(page)` walks the click command tree that typer builds for an app
(typer.main.get_command) and writes roff: NAME, SYNOPSIS, DESCRIPTION (the
app's help), OPTIONS, COMMANDS (each command and sub-command with its
arguments, options, defaults and help), ENVIRONMENT (the variables the
options read, and the ones a page adds), FILES, EXIT STATUS, SEE ALSO.

Deterministic: the same definitions and version give the same bytes (no
date, no terminal width, no home directory), so a test can compare the
committed pages with a fresh rendering (spa.generated).
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import typer
import typer.main

WIDTH = 76  # source lines: mandoc -Tlint asks for at most 80 bytes (\\& may add 2)
_RICH_ESCAPE = re.compile(r"\\(\[)")  # typer help is rich markup: "\[x]" shows "[x]"


@dataclass(frozen=True, slots=True)
class Page:
    """One man page: the app and what its definitions cannot say."""

    program: str
    section: int
    summary: str  # NAME's line after the dash
    app: typer.Typer
    version: str
    environment: tuple[tuple[str, str], ...] = ()  # (VARIABLE, what it does) beyond envvar=
    files: tuple[tuple[str, str], ...] = ()  # (path, what it is)
    exit_status: tuple[tuple[str, str], ...] = ()  # (code, meaning)
    see_also: tuple[str, ...] = ()  # "spa-client(1)"


def escape(text: str) -> str:
    """Text as roff: backslashes, and dashes as \\- (so that options copy
    and paste as typed)."""
    text = _RICH_ESCAPE.sub(r"\1", text)
    return text.replace("\\", "\\e").replace("-", "\\-")


def fill(text: str) -> list[str]:
    """Running text as roff lines of at most WIDTH characters (roff fills
    them again); a line that would start with a dot or a quote (a request
    to roff) is guarded with \\&.  No lines for empty text."""
    lines = textwrap.wrap(escape(" ".join(text.split())), width=WIDTH,
                          break_long_words=False, break_on_hyphens=False)
    return [("\\&" if line.startswith((".", "'")) else "") + line for line in lines]


def _paragraphs(text: str | None) -> list[str]:
    """Help text as paragraphs (blank lines split them; lines inside join)."""
    if not text:
        return []
    blocks = re.split(r"\n\s*\n", text.strip())
    return [" ".join(block.split()) for block in blocks if block.strip()]


def _metavar(param: Any, ctx: Any) -> str:
    if param.metavar:
        return str(param.metavar)
    try:
        shown = str(param.make_metavar(ctx))
    except TypeError:  # click before 8.2: make_metavar() takes no context
        shown = str(param.make_metavar())
    shown = shown.strip("<>[]{}.").upper().removesuffix(" RANGE")
    return {"STR": "TEXT", "STRING": "TEXT", "BOOLEAN": ""}.get(shown, shown)


def _is_flag(param: Any) -> bool:
    return bool(getattr(param, "is_flag", False)) or bool(getattr(param, "count", False))


def _default(param: Any) -> str | None:
    if not getattr(param, "show_default", False) or _is_flag(param):
        return None
    value = param.default
    if value is None or value == () or value == [] or str(value) == "":
        return None
    return str(value)


def _option(param: Any, ctx: Any) -> list[str]:
    """An option as a .TP entry: names, metavar, help, default, variable."""
    names = sorted(param.opts, key=lambda n: (n.startswith("--"), n))
    shown = ", ".join(f"\\fB{escape(name)}\\fR" for name in names)
    for name in param.secondary_opts:
        shown += f", \\fB{escape(name)}\\fR"
    if not _is_flag(param):
        shown += f" \\fI{escape(_metavar(param, ctx))}\\fR"
    text = " ".join((param.help or "").split())
    notes = []
    if (default := _default(param)) is not None:
        notes.append(f"Default: {default}.")
    if param.multiple:
        notes.append("May be given more than once.")
    if param.required:
        notes.append("Required.")
    if param.envvar:
        notes.append(f"Environment: {param.envvar}.")
    body = " ".join(part for part in (text, *notes) if part)
    return [".TP", shown, *fill(body)]


def _argument(param: Any, ctx: Any) -> list[str]:
    name = _metavar(param, ctx) or str(param.name).upper()
    text = " ".join((getattr(param, "help", None) or "").split())
    if not param.required:
        text = (text + " Optional.").strip()
    return [".TP", f"\\fI{escape(name.strip('[]'))}\\fR", *fill(text)]


def _params(command: Any, ctx: Any, *, with_help: bool) -> list[str]:
    out: list[str] = []
    params = command.get_params(ctx)
    for param in params:
        if param.param_type_name == "argument":
            out += _argument(param, ctx)
    for param in params:
        if param.param_type_name != "option" or getattr(param, "hidden", False):
            continue
        if not with_help and "--help" in param.opts:
            continue
        out += _option(param, ctx)
    return out


def _walk(command: Any, ctx: Any) -> Iterator[tuple[Any, Any]]:
    """Every command below `command` (depth first, in the app's order)."""
    if not hasattr(command, "list_commands"):
        return
    for name in command.list_commands(ctx):
        sub = command.get_command(ctx, name)
        if sub is None or getattr(sub, "hidden", False):
            continue
        sub_ctx = sub.context_class(sub, info_name=name, parent=ctx)
        yield sub, sub_ctx
        yield from _walk(sub, sub_ctx)


def _usage(command: Any, ctx: Any) -> list[str]:
    """[OPTIONS], then the arguments: optional ones in brackets."""
    pieces = ["[OPTIONS]"]
    for param in command.get_params(ctx):
        if param.param_type_name != "argument":
            continue
        name = _metavar(param, ctx).strip("[]") or str(param.name).upper()
        if param.nargs == -1:
            name += "..."
        pieces.append(name if param.required else f"[{name}]")
    if hasattr(command, "list_commands"):
        pieces.append("[COMMAND]" if command.invoke_without_command else "COMMAND")
    return pieces


def _command_section(command: Any, ctx: Any) -> list[str]:
    usage = " ".join([ctx.command_path, *_usage(command, ctx)])
    out = [f'.SS "{escape(usage)}"']
    for index, paragraph in enumerate(_paragraphs(command.help)):
        if index:
            out.append(".PP")
        out += fill(paragraph)
    return out + _params(command, ctx, with_help=False)


def _environment(page: Page, root: Any, ctx: Any) -> list[tuple[str, str]]:
    found: dict[str, str] = {}
    for command, command_ctx in [(root, ctx), *_walk(root, ctx)]:
        for param in command.get_params(command_ctx):
            for variable in ([param.envvar] if isinstance(param.envvar, str)
                             else list(param.envvar or ())):
                option = max(param.opts, key=len)
                where = command_ctx.command_path
                found.setdefault(variable, f"Sets {option} of {where}: "
                                           f"{' '.join((param.help or '').split())}")
    for variable, text in page.environment:
        found.setdefault(variable, text)
    return list(found.items())


def _definitions(title: str, items: Sequence[tuple[str, str]], font: str) -> list[str]:
    if not items:
        return []
    out = [f".SH {title}"]
    for term, text in items:
        out += [".TP", f"\\f{font}{escape(term)}\\fR", *fill(text)]
    return out


def render(page: Page) -> str:
    """The page as roff text (ends with a newline)."""
    root = typer.main.get_command(page.app)
    ctx = root.context_class(root, info_name=page.program)
    title = page.program.upper()
    out = [
        f'.\\" {page.program}({page.section}): generated from its command definitions by',
        '.\\" python -m spa.generated; do not edit (a test compares).',
        f'.TH "{escape(title)}" "{page.section}" "" "spa {escape(page.version)}" '
        f'"{"System Administration" if page.section == 8 else "User Commands"}"',
        ".nh",  # no hyphenation: paths and commands copy as printed
        ".ad l",
        ".SH NAME",
        f"{escape(page.program)} \\- {escape(page.summary)}",
        ".SH SYNOPSIS",
        f"\\fB{escape(page.program)}\\fR [\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
        ".SH DESCRIPTION",
    ]
    for index, paragraph in enumerate(_paragraphs(root.help)):
        if index:
            out.append(".PP")
        out += fill(paragraph)
    out += [".SH OPTIONS", *_params(root, ctx, with_help=True), ".SH COMMANDS"]
    for command, command_ctx in _walk(root, ctx):
        out += _command_section(command, command_ctx)
    out += _definitions("ENVIRONMENT", _environment(page, root, ctx), "B")
    out += _definitions("FILES", page.files, "I")
    out += _definitions("EXIT STATUS", page.exit_status, "B")
    if page.see_also:
        refs = []
        for ref in page.see_also:
            name, _, section = ref.partition("(")
            refs.append(f".BR {escape(name)} ({section}")
        out += [".SH SEE ALSO", *[r + "," for r in refs[:-1]], refs[-1]]
    return "\n".join(out) + "\n"
