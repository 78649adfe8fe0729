"""The rendered module's own top-level names against the spec's (issue 12, item 2).

lower.RESERVED lists the names the generated code uses, by hand; this stage reads them from the module
itself, so a helper, table or import a template gains later is kept apart from the spec's names without
anyone adding it to a list. A declared name that the module binds at its top level (besides the class
itself) would shadow it where the name is a parameter or local (a hyperparameter `_pow` hides the helper
the step calls), or replace it (a class `_MADE` replaces the table of that name, and `optdsl.compile`
returned the table): each is a spec error at the name, saying so.
"""
from __future__ import annotations

import ast as pyast
from collections import Counter

from . import ast
from .errors import Span, SpecError
from .lower import STATE_DERIVED


def _bindings(body: list[pyast.stmt], found: Counter) -> None:
    """Names bound at the module's top level (inside if/try/with too, not inside functions or classes)."""
    for node in body:
        if isinstance(node, (pyast.FunctionDef, pyast.AsyncFunctionDef, pyast.ClassDef)):
            found[node.name] += 1
        elif isinstance(node, pyast.ImportFrom) and node.module == "__future__":
            continue  # binds `annotations`, which nothing reads
        elif isinstance(node, (pyast.Import, pyast.ImportFrom)):
            for alias in node.names:
                found[(alias.asname or alias.name).split(".")[0]] += 1
        elif isinstance(node, (pyast.Assign, pyast.AnnAssign, pyast.AugAssign)):
            for target in node.targets if isinstance(node, pyast.Assign) else [node.target]:
                for n in pyast.walk(target):
                    if isinstance(n, pyast.Name):
                        found[n.id] += 1
        else:
            for field in ("body", "orelse", "finalbody"):
                _bindings(getattr(node, field, None) or [], found)
            for handler in getattr(node, "handlers", None) or []:
                if handler.name:
                    found[handler.name] += 1
                _bindings(handler.body, found)


def module_names(tree: pyast.Module) -> Counter:
    found: Counter = Counter()
    _bindings(tree.body, found)
    return found


def _declared(spec: ast.Spec):
    """(name, span, what) for every name of the spec that becomes a Python name in the module."""
    for h in spec.hypers:
        yield h.name, h.span, "the hyperparameter"
        if h.keyword:
            yield h.keyword, h.keyword_span or h.span, "the keyword"
    for tup in spec.tuples:
        yield tup.keyword, tup.span, "the keyword"
    for i in spec.inputs:
        yield i.name, i.span, "the input"
    for s in spec.states + tuple(s for r in spec.rules for s in r.states):
        yield s.name, s.span, "the state"
        for pattern in STATE_DERIVED:
            yield pattern.format(s.name), s.span, f"the name '{pattern.format(s.name)}' that state '{s.name}' makes"
    for a in spec.body:  # `group NAME = ...`: a local of the group phase
        if isinstance(a, ast.Assign) and a.group:
            yield a.target, a.target_span, "the group value"


def check(python: str, spec: ast.Spec) -> None:
    """SpecError at the first declared name the module binds at its top level for itself."""
    tree = pyast.parse(python)
    bound = module_names(tree)
    if bound[spec.name] > 1:
        raise SpecError(f"'{spec.name}' is a name the generated module uses itself", spec.name_span,
                        hint=f"the class would replace it; choose another name, e.g. '{spec.name.strip('_')}Opt'")
    func = _functional(tree)
    if func is not None and bound[func] > 1:
        raise SpecError(f"the class '{spec.name}' makes the functional '{func}', a name the generated module "
                        "uses itself", spec.name_span, hint=f"choose another class name, e.g. "
                                                            f"'{spec.name.strip('_')}Opt'")
    params = _duplicate_parameters(tree)
    for name, span, what in _declared(spec):
        if name in params:
            subject = what if "'" in what else f"{what} '{name}'"
            raise SpecError(f"{subject} is a parameter name the generated code's {params[name]}() takes itself",
                            span if isinstance(span, Span) else spec.name_span,
                            hint=f"rename it, e.g. '{name.strip('_')}_'")
        if bound[name]:
            subject = what if "'" in what else f"{what} '{name}'"
            raise SpecError(f"{subject} is a name the generated module defines itself (a helper, table or "
                            "import), which it would hide", span if isinstance(span, Span) else spec.name_span,
                            hint=f"rename it, e.g. '{name.strip('_')}_'")


def _functional(tree: pyast.Module) -> str | None:
    """The functional's name, from the module's __all__ (the class, then the functional)."""
    for node in tree.body:
        if isinstance(node, pyast.Assign) and any(isinstance(t, pyast.Name) and t.id == "__all__" for t in node.targets):
            names = [e.value for e in getattr(node.value, "elts", []) if isinstance(e, pyast.Constant)]
            return names[1] if len(names) > 1 else None
    return None


def _duplicate_parameters(tree: pyast.Module) -> dict[str, str]:
    """Names a generated function takes twice (a hyperparameter `generator` beside the step's own
    `generator=None`: a SyntaxError at import), with that function's name."""
    found = {}
    for node in pyast.walk(tree):
        if isinstance(node, (pyast.FunctionDef, pyast.AsyncFunctionDef, pyast.Lambda)):
            a = node.args
            names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs] + [
                x.arg for x in (a.vararg, a.kwarg) if x is not None]
            seen = set()
            for n in names:
                if n in seen:
                    found.setdefault(n, getattr(node, "name", "lambda"))
                seen.add(n)
    return found
