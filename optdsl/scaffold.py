"""`optdsl new`: a first spec to edit, commented, that compiles as it stands."""
from __future__ import annotations

import re
from pathlib import Path

from . import escape
from .build import no_such_spec, read_spec, resolve_spec
from .pipeline import compile_source

# Adam's shape, because most new optimizers are edits of it; every line says what it is for.
TEMPLATE = '''\
# {name}: a new optimizer, scaffolded by `optdsl new`. Change the rule below, then:
#   warnings (zero denominators, sqrt/log domains):  optdsl check {path}
#   the rule as math, state ranges, invariances:     optdsl explain {path}
#   one generated module per spec:                   optdsl build {folder}/
# The language is described in docs/language.md.
optimizer {name} "One line on what {name} does, and the paper it comes from"

# Hyperparameters: keyword arguments of the class and param_groups keys. The range is
# checked by the constructor and tells the checks which values to expect.
hyper lr = 1e-3 in [0, inf)
hyper b1 = 0.9 in [0, 1), b2 = 0.999 in [0, 1)
hyper eps = 1e-8 in (0, inf), wd = 0 in [0, inf)

# States: tensors shaped like p, kept in state_dict(), zero at the start
# (`state s = p` starts s as a copy of the parameter).
state m, v

# The step, in order, for each parameter: p is the parameter, g its gradient, t the
# step count (1 on the first step). Names assigned here are locals: no declaration.
m = lerp(m, g, 1 - b1)                  # a running mean of the gradient
v = lerp(v, g^2, 1 - b2)                # and of its square
m_hat = m / (1 - b1^t)                  # bias corrections: m and v start at 0
v_hat = v / (1 - b2^t)
p -= lr * wd * p                        # decoupled weight decay
p -= lr * m_hat / (sqrt(v_hat) + eps)
'''

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
# The header's class name: `optimizer` starts a line, so it is never inside a comment.
_HEADER = re.compile(r"^(\s*optimizer\s+)([A-Za-z_][A-Za-z0-9_]*)", re.MULTILINE)


class ScaffoldError(Exception):
    """A name, folder or source spec `optdsl new` cannot use; the message says what to do."""


def class_name(name: str) -> str:
    """`my_adam`, `my-adam` -> `MyAdam`; a name already in CamelCase (`AdamW`) stays as it is."""
    if not _NAME.fullmatch(name):
        raise ScaffoldError(f"{name!r} is not a usable optimizer name: use letters, digits, '_' or '-', "
                            "starting with a letter (e.g. MyAdam or my_adam)")
    words = [w for w in re.split(r"[_-]", name) if w]
    if len(words) == 1 and not name.islower():
        return name
    return "".join(w[:1].upper() + w[1:] for w in words)


def snake_name(name: str) -> str:
    """`MyAdam` -> `my_adam`, `SGDMomentum` -> `sgd_momentum`: the spec's file name."""
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", class_name(name))
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()


def scaffold_text(name: str, target: Path, source: Path | None = None) -> str:
    """The text of the new spec; it compiles (a SpecError here is a broken `source`)."""
    cls = class_name(name)
    if source is None:
        # paths go into comments of the spec through escape.text, so a newline in one cannot start a line
        text = TEMPLATE.format(name=cls, path=escape.text(target.as_posix()),
                               folder=escape.text(target.parent.as_posix()))
    else:
        original = read_spec(source)
        compile_source(original, source.as_posix())  # a broken source is reported where it is broken
        if not _HEADER.search(original):
            raise ScaffoldError(f"{source.as_posix()} has no 'optimizer NAME' line to rename")
        text = f"# {cls}: started from {escape.text(source.as_posix())} by `optdsl new`.\n"
        text += _HEADER.sub(lambda m: m[1] + cls, original, count=1)
    compile_source(text, target.as_posix())
    return text


def new_spec(name: str, out_dir: str | Path = "specs", source: str | None = None) -> Path:
    """Write `out_dir/<snake_name>.opt`; never overwrite. Returns the path written."""
    target = Path(out_dir) / f"{snake_name(name)}.opt"
    if target.exists():
        raise ScaffoldError(f"{target.as_posix()} already exists and is left as it is: "
                            "choose another NAME, or another folder with -o DIR")
    origin = resolve_spec(source) if source else None
    if origin and not origin.is_file():
        raise ScaffoldError(no_such_spec(source))
    text = scaffold_text(name, target, origin)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "x", encoding="utf-8", newline="\n") as f:  # "x": a file that appeared meanwhile is kept
        f.write(text)
    return target
