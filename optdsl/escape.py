"""The one way user text (a spec's lines, its docstring, a file or folder name) enters generated code.

Generated modules hold user text only inside comments, docstrings and string literals. `text`
writes it so that it cannot leave them, wherever a template puts it: no character Python reads as
a line break (\\n, \\r; U+2028 and the like are escaped too, since str.splitlines() honours them),
no quote that could close a string, no backslash that could escape a closing quote. What is left
is printable text and tabs, as Python's repr keeps them; every other character is written as repr
escapes it (\\u2028, \\x0c). In a non-raw string the escapes read back as the original text.
"""
from __future__ import annotations

import keyword

_ESCAPES = {"\\": "\\\\", '"': '\\"'}


def text(s: str) -> str:
    """`s` safe inside a comment, a docstring or a string literal of generated code (see above)."""
    return "".join(_ESCAPES.get(c) or (c if c.isprintable() or c == "\t" else repr(c)[1:-1]) for c in str(s))


def is_name(s: str) -> bool:
    """Whether `s` can stand in generated code as a Python name: an ASCII identifier, not a keyword."""
    return s.isascii() and s.isidentifier() and not keyword.iskeyword(s)


def literal(value: str | None) -> str:
    """A named choice (None or a string) as a Python literal in generated code: "text", escaped by `text`."""
    return "None" if value is None else f'"{text(value)}"'


def shown(value: str | None) -> str:
    """A named choice as a message or docstring shows it ('adam', None), inside a string that is not
    an f-string (braces stay text): escaped by `text`."""
    return "None" if value is None else f"'{text(value)}'"


def message(s: str | None) -> str:
    """Text that generated code shows in an error it raises (a refusal's reason, the spec's file name and
    lines) as a Python literal: `visible` first, so that what reads back at runtime holds no character a
    terminal obeys or reorders (a CR, ESC, U+2028), then `literal`, so that it cannot leave the string."""
    return "None" if s is None else literal(visible(s))


def visible(s: str, keep: str = "\n\t") -> str:
    """`s` as a terminal may show it: every character that is not printable (ESC and the other
    controls, C1's CSI, bidirectional controls such as U+202E, U+2028) written as repr escapes it, so
    that a spec's line, a file name or a docstring in a message can neither drive the terminal nor
    reorder what it shows (Trojan Source); the characters in `keep` stay as they are."""
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in str(s))
