"""How slimtune quotes an exception inside its own one-line error messages."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The exception's first message line, at most ``limit`` characters, else its type's name
    (an exception with no message has no first line)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
