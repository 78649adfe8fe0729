"""The one error type every bad spec raises, and the warnings the checks give."""
from __future__ import annotations

from dataclasses import dataclass

from .escape import visible


@dataclass(frozen=True)
class Span:
    """Where a piece of a spec stands: 1-based line and column, end exclusive."""

    line: int
    column: int
    end_line: int
    end_column: int


def _caret(source: str, span: Span) -> str:
    # lines as the grammar ends them (\n, \r\n): str.splitlines() also ends one at U+2028, a form feed
    # or a lone CR, which a comment may hold, and showed a later line than the error's
    lines = source.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not 1 <= span.line <= len(lines) + 1:
        return ""
    # past the last line (an empty file, a missing closing line): an empty line, the caret under it
    line = lines[span.line - 1].removesuffix("\r") if span.line <= len(lines) else ""
    # each character as shown: a tab as one space, a control or bidi character as its escape (\x1b,
    # \u202e), never sent to the terminal as it is; the caret stands under the shown characters
    shown = [" " if c == "\t" else visible(c) for c in line]
    start = min(span.column - 1, len(shown))
    end = span.end_column - 1 if span.end_line == span.line else len(shown)
    width = len("".join(shown[start:max(start, end)]))
    return f"    {''.join(shown)}\n    {' ' * len(''.join(shown[:start]))}{'^' * max(1, width)}"


class SpecError(Exception):
    """A spec that cannot be compiled: names file, line, column, shows the line, says what to do."""

    def __init__(self, message: str, span: Span | None = None, *, hint: str = "",
                 filename: str = "<spec>", source: str = "", context: str | None = None):
        self.message, self.span, self.hint = message, span, hint
        self.filename, self.source, self.context = filename, source, context
        super().__init__(str(self))

    def located(self, filename: str, source: str) -> SpecError:
        """The same error, told which file and text it came from."""
        return SpecError(self.message, self.span, hint=self.hint, filename=filename,
                         source=source, context=self.context)

    @property
    def line(self) -> int:
        return self.span.line if self.span else 0

    @property
    def column(self) -> int:
        return self.span.column if self.span else 0

    def __str__(self) -> str:
        where = f"{visible(self.filename)}:{self.line}:{self.column}" if self.span else visible(self.filename)
        parts = [f"{where}: error: {visible(self.message)}"]
        shown = self.context if self.context is not None else (
            _caret(self.source, self.span) if self.span else "")
        if shown:
            parts.append(visible(shown.rstrip("\n")))
        if self.hint:
            parts.append(f"  hint: {visible(self.hint)}")
        return "\n".join(parts)


@dataclass(frozen=True)
class SpecWarning:
    """Something that compiles but may misbehave (a denominator that can be zero, ...)."""

    message: str
    span: Span | None
    hint: str = ""
    filename: str = "<spec>"
    source: str = ""

    def __str__(self) -> str:
        where = f"{visible(self.filename)}:{self.span.line}:{self.span.column}" if self.span else visible(self.filename)
        parts = [f"{where}: warning: {visible(self.message)}"]
        if self.span and self.source:
            parts.append(_caret(self.source, self.span))
        if self.hint:
            parts.append(f"  hint: {visible(self.hint)}")
        return "\n".join(parts)
