"""An allow-list audit of generated modules: only the imports, names, attributes and calls that
optdsl's own templates and printers write. Spec text may reach a module only inside docstrings,
comments and string literals (optdsl/escape.py); anything of it that became code fails here.

conftest.py audits every module rendered while the tests run; tests/test_security.py audits the
shipped specs, random and hostile specs, and shows that a payload fails the audit."""
from __future__ import annotations

import ast
import builtins
import re
from functools import cache
from pathlib import Path

OPTDSL = Path(__file__).resolve().parent.parent / "optdsl"

# Exactly the imports the templates write (module, ((name, alias), ...)); "import" for `import x`.
IMPORTS = {
    ("__future__", (("annotations", None),)),
    ("import", (("math", None),)),
    ("import", (("operator", None),)),
    ("import", (("os", None),)),
    ("import", (("torch", None),)),
    ("torch.optim.optimizer", (("Optimizer", None), ("_default_to_fused_or_foreach", None))),
    ("import", (("triton", None),)),
    ("import", (("triton.language", "tl"),)),
    ("import", (("torch.distributed", "_dist"),)),  # sharded parameters (optdsl/templates/sharding.py.j2)
    ("torch.distributed.tensor", (("DTensor", "_DTensor"), ("Partial", "_Partial"), ("Replicate", "_Replicate"), ("Shard", "_Shard"))),
}
MODULES = {"torch", "math", "os", "operator", "triton", "tl", "Optimizer", "_dist"}
# The built-ins generated code calls or names; eval, exec, open, getattr, __import__ are not among them.
BUILTINS = {"ImportError", "KeyError", "RuntimeError", "TypeError", "ValueError", "ZeroDivisionError",
            "all", "any", "abs", "bool", "dict", "enumerate", "float", "int", "isinstance", "iter", "len",
            "list", "map", "max", "min", "next", "range", "set", "sorted", "staticmethod", "str", "sum",
            "super", "tuple", "zip", "round", "repr", "type", "reversed", "NotImplementedError", "OverflowError",
            "ArithmeticError", "FloatingPointError", "complex", "hasattr"}
assert not BUILTINS - set(dir(builtins))
DUNDERS = {"__init__", "__setstate__", "__getstate__", "__name__"}  # super().__init__(...), super().__getstate__(),
# super().__setstate__(state), type(value).__name__ in load_state_dict's messages
_TOP_ASSIGN = re.compile(r"__all__|LAUNCHES|_[A-Z][A-Z0-9_]*")  # module constants and caches


@cache
def allowed_chains() -> frozenset[str]:
    """Dotted names on the imported modules (torch.sqrt, tl.where, os.environ.get) that optdsl's
    templates, printers and function table write literally: a payload can use none beyond them."""
    found = set()
    sources = [*OPTDSL.glob("templates/*.j2"), *OPTDSL.glob("backends/*.py"), OPTDSL / "functions.py"]
    pattern = re.compile(r"\b(" + "|".join(MODULES) + r")((?:\.\w+)+)")
    for path in sources:
        for root, rest in pattern.findall(path.read_text(encoding="utf-8")):
            parts = [root, *rest[1:].split(".")]
            found.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    found.update({"torch." + name for name in ("float32", "float64", "float16", "bfloat16", "int32", "int64")})
    # The emitter prints torch.{op}, torch.{op}_ and torch._foreach_{op}(_) from the op and function
    # names of its own table and the function table (string literals there).
    ops = {op for path in (OPTDSL / "backends" / "tensor_ops.py", OPTDSL / "functions.py")
           for op in re.findall(r'"([a-z][a-z0-9_]*)"', path.read_text(encoding="utf-8"))}
    found.update(f"torch.{prefix}{op}{suffix}" for op in ops for prefix in ("", "_foreach_") for suffix in ("", "_"))
    return frozenset(found)


def _chain(node: ast.AST) -> tuple[str | None, list[str]]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return (node.id if isinstance(node, ast.Name) else None), parts[::-1]


def _import_key(node) -> tuple:
    names = tuple((a.name, a.asname) for a in node.names)
    return ("import", names) if isinstance(node, ast.Import) else (node.module, names)


def _bound(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Global):
            names.update(node.names)
    return names


def _top_level(tree: ast.Module) -> list[str]:
    """What stands at the module's top and in class bodies: docstrings, the imports, constants,
    definitions, the try/except of the Triton import and `if triton is not None:`. No bare calls."""
    problems = []

    def body(stmts, where, class_body=False):
        for i, s in enumerate(stmts):
            line = f"{where} line {s.lineno}"
            if i == 0 and isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) and isinstance(
                    s.value.value, str):
                continue  # the docstring
            if isinstance(s, (ast.Import, ast.ImportFrom)):
                continue  # checked with every import below
            if isinstance(s, (ast.FunctionDef, ast.ClassDef)):
                if isinstance(s, ast.ClassDef):
                    body(s.body, f"class {s.name}", class_body=True)
                continue
            if isinstance(s, ast.Assign) and all(isinstance(t, ast.Name) for t in s.targets):
                names = [t.id for t in s.targets]
                if all(_TOP_ASSIGN.fullmatch(n) for n in names):
                    continue
                problems.append(f"{line}: assignment to {names} where only constants stand")
                continue
            if not class_body and isinstance(s, ast.Try) and all(
                    isinstance(x, (ast.Import, ast.ImportFrom)) for x in s.body):
                continue
            if not class_body and isinstance(s, ast.If) and ast.unparse(s.test) == "triton is not None":
                body(s.body, where)
                continue
            problems.append(f"{line}: {type(s).__name__} statement {ast.unparse(s)[:80]!r}")
    body(tree.body, "module")
    return problems


def _hands_out(node: ast.Yield) -> bool:
    """The one yield the templates write: the for-loop path's step of a DTensor parameter hands out
    a stage's partial results by name (`a, b = yield a, b`), or nothing (`yield`), to _in_stages."""
    return node.value is None or isinstance(node.value, ast.Tuple) and all(isinstance(e, ast.Name) for e in node.value.elts)


def audit(source: str) -> list[str]:
    """Problems of a generated module against the allow-list (empty: it passes)."""
    try:
        tree = ast.parse(source)
    except SyntaxError as err:
        return [f"not valid Python: {err}"]
    problems = _top_level(tree)
    bound, chains = _bound(tree), allowed_chains()
    # getattr(self, "grad_scale", None): only on self, with a constant attribute name, never a dunder
    literal_getattr = {id(c.func) for c in ast.walk(tree) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)
                       and c.func.id == "getattr" and len(c.args) >= 2 and isinstance(c.args[0], ast.Name)
                       and c.args[0].id == "self" and isinstance(c.args[1], ast.Constant)
                       and isinstance(c.args[1].value, str) and not c.args[1].value.startswith("__")}
    for node in ast.walk(tree):
        line = getattr(node, "lineno", "?")
        if isinstance(node, (ast.Import, ast.ImportFrom)) and _import_key(node) not in IMPORTS:
            problems.append(f"line {line}: import {ast.unparse(node)!r}")
        elif isinstance(node, ast.Name) and node.id not in bound and node.id not in BUILTINS and (
                id(node) not in literal_getattr):
            problems.append(f"line {line}: name {node.id!r} is neither defined in the module nor an allowed built-in")
        elif isinstance(node, ast.Attribute):
            if node.attr.startswith("__") and node.attr not in DUNDERS:
                problems.append(f"line {line}: attribute {node.attr!r}")
            root, parts = _chain(node)
            if root in MODULES:
                dotted = ".".join([root, *parts])
                if dotted not in chains:
                    problems.append(f"line {line}: {dotted} is not written by optdsl's templates")
        elif isinstance(node, (ast.Global, ast.Nonlocal)) and not set(node.names) <= {"LAUNCHES"}:
            problems.append(f"line {line}: {ast.unparse(node)!r}")
        elif isinstance(node, (ast.Lambda, ast.AsyncFunctionDef, ast.Await, ast.YieldFrom)) or (
                isinstance(node, ast.Yield) and not _hands_out(node)):
            problems.append(f"line {line}: {type(node).__name__}")
    return problems
