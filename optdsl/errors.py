"""The one error type every bad spec raises, and the warnings the checks give."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """Where a piece of a spec stands: 1-based line and column, end exclusive."""

    line: int
    column: int
    end_line: int
    end_column: int


def _caret(source: str, span: Span) -> str:
    lines = source.splitlines()
    if not 1 <= span.line <= len(lines) + 1:
        return ""
    # past the last line (an empty file, a missing closing line): an empty line, the caret under it
    text = lines[span.line - 1].expandtabs(1) if span.line <= len(lines) else ""
    width = span.end_column - span.column if span.end_line == span.line else len(text) - span.column + 1
    return f"    {text}\n    {' ' * (span.column - 1)}{'^' * max(1, width)}"


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
        where = f"{self.filename}:{self.line}:{self.column}" if self.span else self.filename
        parts = [f"{where}: error: {self.message}"]
        shown = self.context if self.context is not None else (
            _caret(self.source, self.span) if self.span else "")
        if shown:
            parts.append(shown.rstrip("\n"))
        if self.hint:
            parts.append(f"  hint: {self.hint}")
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
        where = f"{self.filename}:{self.span.line}:{self.span.column}" if self.span else self.filename
        parts = [f"{where}: warning: {self.message}"]
        if self.span and self.source:
            parts.append(_caret(self.source, self.span))
        if self.hint:
            parts.append(f"  hint: {self.hint}")
        return "\n".join(parts)
