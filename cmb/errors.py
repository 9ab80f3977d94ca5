"""User-facing errors: each names the file (or setting) and the problem."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar


class CMBError(Exception):
    """A problem with user input or configuration that the user can fix."""


class DataError(CMBError):
    """A data file is missing, unreadable or not what the layout promises."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)


class ConfigError(CMBError):
    """A setting is out of range or names something that does not exist."""


F = TypeVar("F", bound=Callable[..., Any])


def user_error_in(err: BaseException) -> CMBError | None:
    """The `CMBError` in `err` or its cause/context chain (MONAI's Compose wraps errors raised inside a
    transform in a RuntimeError), or None."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, CMBError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def describe_scan_failure(err: Exception, path: str | Path) -> str:
    """One line naming the file and the cause, for a scan that failed inside a batch."""
    found = user_error_in(err)
    if found is not None:
        text = str(found)
        return text if str(path) in text else f"{path}: {text}"
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{path}: unexpected {type(err).__name__}: {first}"


def exit_on_user_error(fn: F) -> F:
    """Turn a `CMBError` into one line on stderr and exit status 2 (no traceback)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CMBError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


def exit_on_failures(failed: list[str], total: int, what: str) -> None:
    """After a batch that went on past its bad items: one line on stderr naming them (`what`, e.g. "scans
    failed") and exit status 2; nothing when none failed."""
    if failed:
        print(f"error: {len(failed)} of {total} {what}: {', '.join(failed)}", file=sys.stderr, flush=True)
        sys.exit(2)
