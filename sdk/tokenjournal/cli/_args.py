"""What every subcommand's arguments share: the program name, the help layout, number types."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Final, TypeAlias

PROG: Final = "tokenjournal"
EXIT_USAGE: Final = 2

#: ``parser.add_subparsers()``'s result: what each subcommand's ``register`` adds itself to.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
#: What ``register`` stores as the ``handler`` default: the parsed arguments in, an exit status out.
Handler = Callable[[argparse.Namespace], int]


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps our hand-wrapped descriptions and examples; room for the longest command name."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)


def positive(text: str) -> float:
    """An argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def finite_positive(text: str) -> float:
    """An argparse type: a number > 0 and finite (``inf`` would overflow a timer)."""
    value = positive(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse
