"""optdsl: write an optimizer's math in a few lines, get a torch.optim.Optimizer.

    import optdsl
    AdamW = optdsl.load("specs/adamw.opt")
    opt = AdamW(model.parameters(), lr=1e-3)
"""
from __future__ import annotations

import hashlib
import linecache
import sys
import types
from pathlib import Path

from .errors import SpecError, SpecWarning

__all__ = ["compile", "load", "compile_source", "Compiled", "SpecError", "SpecWarning"]
__version__ = "0.1.0"

_builtin_compile = compile


def __getattr__(name: str):
    # The pipeline imports SymPy, Lark and Jinja: only once a spec is compiled, so that
    # `import optdsl` and `optdsl --help` start at once.
    if name in ("compile_source", "Compiled"):
        from . import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'optdsl' has no attribute {name!r}")


def _module_name(text: str, filename: str) -> str:
    """Stable across processes for the same spec: a spawned worker, or a process unpickling an
    optimizer, that loads the same spec registers the same module, so classes pickle by reference."""
    digest = hashlib.sha256(f"{__version__}\0{filename}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()[:20]
    return f"optdsl._spec_{digest}"


def _module_from(compiled, text: str, filename: str) -> types.ModuleType:
    module_name = _module_name(text, filename)
    module = types.ModuleType(module_name)
    module.__file__ = f"<optdsl {compiled.program.name} {module_name}>"
    module.__optdsl_spec__ = (text, filename)
    sys.modules[module_name] = module  # lets pickle and torch find the class
    # inspect (and so @triton.jit, tracebacks, torch.compile) finds the source here
    linecache.cache[module.__file__] = (len(compiled.python), None, compiled.python.splitlines(True),
                                        module.__file__)
    exec(_builtin_compile(compiled.python, module.__file__, "exec"), module.__dict__)  # noqa: S102 - our own output
    cls = getattr(module, compiled.program.name)
    cls._optdsl_spec = (text, filename)
    cls.__reduce_ex__ = _reduce_ex
    return module


def _reduce_ex(self, protocol):
    """Pickle an optimizer of a compiled class with its spec's text, so that unpickling recompiles
    the class in a process that never loaded the spec (torch.save, spawned workers)."""
    spec = type(self).__dict__.get("_optdsl_spec")
    if spec is None:  # a user's subclass: pickled by reference, as any class
        return object.__reduce_ex__(self, protocol)
    return _rebuild, (*spec, type(self).__name__), self.__getstate__()


def _rebuild(text: str, filename: str, name: str):
    """An empty instance of the class `text` compiles to (pickle then calls __setstate__): the one
    this process already has, else compiled now."""
    module = sys.modules.get(_module_name(text, filename))
    if module is not None and getattr(module, "__optdsl_spec__", None) == (text, filename):
        cls = getattr(module, name)
    else:
        cls = compile(text, filename)
    return cls.__new__(cls)


def compile(text: str, filename: str = "<spec>") -> type:  # noqa: A001 - the public name
    """Compile spec text to a torch.optim.Optimizer subclass, in memory."""
    from .pipeline import compile_source
    compiled = compile_source(text, filename)
    return getattr(_module_from(compiled, text, filename), compiled.program.name)


def load(path: str | Path) -> type:
    """Compile the spec file at `path` to a torch.optim.Optimizer subclass, in memory. The file is read as
    `optdsl build` reads one (optdsl.build.read_spec): UTF-8, a regular file of at most 1 MiB."""
    from .build import read_spec
    path = Path(path)
    return compile(read_spec(path), str(path))
