"""optdsl: write an optimizer's math in a few lines, get a torch.optim.Optimizer.

    import optdsl
    AdamW = optdsl.load("specs/adamw.opt")
    opt = AdamW(model.parameters(), lr=1e-3)
"""
from __future__ import annotations

import linecache
import sys
import types
from pathlib import Path

from .errors import SpecError, SpecWarning
from .pipeline import Compiled, compile_source

__all__ = ["compile", "load", "compile_source", "Compiled", "SpecError", "SpecWarning"]
__version__ = "0.1.0"


_builtin_compile = compile


def _module_from(compiled: Compiled, module_name: str) -> types.ModuleType:
    module = types.ModuleType(module_name)
    module.__file__ = f"<optdsl {module_name}>"
    sys.modules[module_name] = module  # lets pickle and torch find the class
    # inspect (and so @triton.jit, tracebacks, torch.compile) finds the source here
    linecache.cache[module.__file__] = (len(compiled.python), None, compiled.python.splitlines(True),
                                        module.__file__)
    exec(_builtin_compile(compiled.python, module.__file__, "exec"), module.__dict__)  # noqa: S102 - our own output
    return module


def compile(text: str, filename: str = "<spec>") -> type:  # noqa: A001 - the public name
    """Compile spec text to a torch.optim.Optimizer subclass, in memory."""
    compiled = compile_source(text, filename)
    module = _module_from(compiled, f"optdsl_generated.{compiled.program.name}")
    return getattr(module, compiled.program.name)


def load(path: str | Path) -> type:
    """Compile the spec file at `path` to a torch.optim.Optimizer subclass, in memory."""
    path = Path(path)
    return compile(path.read_text(encoding="utf-8"), str(path))
