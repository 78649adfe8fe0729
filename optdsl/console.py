"""Terminal output for the CLI: coloured errors and a progress bar, both only on a terminal.

Errors and warnings are painted from their plain text, line by line, so the plain format
(`file:line:col: error: ...`, the line, a caret, a hint) is the one source of truth: with
colour off the output is exactly `str(err)`, with colour on it is that text with styles.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Callable, TextIO

from .escape import visible

if TYPE_CHECKING:  # rich is imported where it paints: a command that prints nothing fancy never loads it
    from rich.text import Text


# The first line of an error or warning: "where: error: message".
_HEADLINE = re.compile(r"^(?P<where>\S.*?): (?P<kind>error|warning): (?P<msg>.*)$")
_CARET = re.compile(r"^(?P<indent>\s*)\^+\s*$")
_HINT = re.compile(r"^(?P<indent>\s*)hint: (?P<text>.*)$")

STYLES = {"where": "bold", "error": "bold red", "warning": "bold magenta", "caret": "bold red",
          "hint": "cyan"}


def colour_enabled(stream: TextIO) -> bool:
    """Colour only for a person at a terminal: not when piped, not with NO_COLOR, not on a dumb TERM."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def paint(report: str) -> Text:
    """An error or warning's plain text with styles on the location, kind, caret and hint."""
    from rich.text import Text
    text = Text()
    for i, line in enumerate(report.split("\n")):
        if i:
            text.append("\n")
        if m := _HEADLINE.match(line):
            kind = m["kind"]
            text.append(m["where"], STYLES["where"]).append(": ").append(kind, STYLES[kind])
            text.append(": ").append(m["msg"], "bold")
        elif m := _CARET.match(line):
            text.append(m["indent"]).append(line[len(m["indent"]):], STYLES["caret"])
        elif m := _HINT.match(line):
            text.append(m["indent"]).append("hint:", STYLES["hint"]).append(" " + m["text"])
        else:
            text.append(line)
    return text


def show(report: object, stream: TextIO | None = None) -> None:
    """Print an error, a warning or any diagnostic text: painted on a terminal, plain otherwise."""
    stream = stream or sys.stderr
    plain = visible(str(report))  # a file name or spec text in it cannot drive the terminal
    if colour_enabled(stream):
        from rich.console import Console
        # soft_wrap: rich must never re-wrap a line, or the caret would leave its column
        Console(file=stream, force_terminal=True, highlight=False, soft_wrap=True).print(paint(plain))
    else:
        print(plain, file=stream)


@contextlib.contextmanager
def progress(total: int, what: str, stream: TextIO | None = None) -> Iterator[Callable[[str], None]]:
    """A progress bar on a terminal (erased when done); nothing at all when `stream` is piped.

    Yields `working_on(label)`: call it as each item starts; the bar counts the items before it.
    """
    stream = stream or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if not (isatty and isatty()) or total < 2:  # one item is over before a bar would help
        yield lambda label: None
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    bar = Progress(TextColumn(f"{what} [progress.description]{{task.description}}"), BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn(),
                   console=Console(file=stream, force_terminal=True, no_color=not colour_enabled(stream)),
                   transient=True)
    started = 0

    def working_on(label: str) -> None:
        nonlocal started
        bar.update(task, completed=started, description=escape(label))  # a '[' in a name is not markup
        started += 1

    with bar:
        task = bar.add_task("", total=total)
        yield working_on
