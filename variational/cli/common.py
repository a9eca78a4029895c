"""What every command module shares: the repository's folder, the one-line error, argument types."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


class CliError(Exception):
    """A problem the user fixes outside the code (a server down, a missing file); main prints one line."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def positive(kind: type) -> Any:
    """An argparse type: a number of `kind` above 0 (argparse prints the one-line usage error otherwise)."""

    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0:  # `not >`: nan too
            raise ValueError(text)
        return value

    parse.__name__ = f"positive {kind.__name__}"  # argparse names the type in its error
    return parse
