"""One config value of the right type, or one line that says which type and the fix.

Invariants:
- A wrong type is refused with the type wanted, the type found and the line
  to write instead, e.g. `port must be an integer (got a string "22"): write
  port = 22`; the line is TOML, as the config file is.
- A secret's value (SECRET_KEYS) is never quoted, not even a wrong one: the
  message names its type only.
- Pure: values in, a value or ConfigError out.
"""

from __future__ import annotations

import datetime
from typing import Any

import tomlkit

from spa.server.errors import ConfigError

# keys whose values are secrets (or the server's id): never quoted in a message
SECRET_KEYS = frozenset({"server_id", "secret", "old_secret", "otp_secret",
                         "fwknop_key", "fwknop_hmac_key"})
_SHOWN = 40  # at most this many characters of a wrong value are quoted
_EXAMPLES: dict[str, Any] = {  # a value to show for a required key, when none can be derived
    "port": 22, "default_duration": 30, "max_duration": 300, "services": ["ssh"],
    "listen": "127.0.0.1:9712",
}
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def expect(where: str, key: str, value: Any, kind: Any, default: Any = None) -> Any:
    """`value` if it is of `kind` (a type or a tuple of types; a bool is never
    an int).  Raises ConfigError naming the type wanted and the fix."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds):
        return value
    secret = key in SECRET_KEYS
    got = describe(value, quote=not secret)
    known = default if default not in (None, "", []) else _EXAMPLES.get(key)
    if str in kinds and known is not None:  # a text's meaning is not its number's
        fixed = known
    else:
        fixed = _converted(value, kinds, secret)
        fixed = known if fixed is None else fixed
    if secret:
        line = f'write {key} = "..." (its base64url text, in quotes)'
    elif fixed is None:
        line = f"write {key} = {_placeholder(kinds)}"
    else:
        line = f"write {key} = {toml(fixed)}"
    raise ConfigError(f"{where} {key} must be {_wanted(kinds)} (got {got}): {line}")


def describe(value: Any, *, quote: bool = True) -> str:
    """What a TOML value is, for a message: 'a string "22"', 'an integer 22'."""
    if isinstance(value, bool):
        name = "a boolean"
    elif isinstance(value, int):
        name = "an integer"
    elif isinstance(value, float):
        name = "a number"
    elif isinstance(value, str):
        name = "a string"
    elif isinstance(value, list):
        return "a list"
    elif isinstance(value, dict):
        return "a table"
    elif isinstance(value, datetime.datetime):
        name = "a date-time"
    elif isinstance(value, datetime.date):
        name = "a date"
    elif isinstance(value, datetime.time):
        name = "a time"
    else:
        return type(value).__name__
    if not quote:
        return name
    shown = toml(value)
    if len(shown) > _SHOWN:
        shown = shown[:_SHOWN - 3] + "..."
    return f"{name} {shown}"


def toml(value: Any) -> str:
    """`value` as TOML writes it on one line (strings quoted and escaped)."""
    if isinstance(value, str):
        return tomlkit.string(value).as_string()
    return str(tomlkit.item(value).as_string())


def _wanted(kinds: tuple[type, ...]) -> str:
    if bool in kinds:
        return "true or false"
    if int in kinds and float in kinds:
        return "a number"
    if int in kinds:
        return "an integer"
    if str in kinds:
        return "a string"
    if list in kinds:
        return "a list"
    return " or ".join(k.__name__ for k in kinds)


def _placeholder(kinds: tuple[type, ...]) -> str:
    if bool in kinds:
        return "true"
    if int in kinds:
        return "30"
    if list in kinds:
        return '["..."]'
    return '"..."'


def _converted(value: Any, kinds: tuple[type, ...], secret: bool) -> Any:
    """What the admin most likely meant, in the wanted type, or None."""
    if bool in kinds:
        text = str(value).strip().lower() if isinstance(value, (str, int)) else ""
        return True if text in _TRUE else False if text in _FALSE else None
    if int in kinds and isinstance(value, str):
        return _number(value.strip(), float in kinds)
    if int in kinds and isinstance(value, float) and value.is_integer():
        return int(value)
    if str in kinds and not secret and isinstance(value, (int, float)):
        return toml(value)
    if list in kinds and isinstance(value, str):
        return [value]
    return None


def _number(text: str, fraction: bool) -> int | float | None:
    try:
        return int(text)
    except ValueError:
        pass
    if fraction:
        try:
            return float(text)
        except ValueError:
            return None
    return None
