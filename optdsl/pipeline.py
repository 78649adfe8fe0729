"""The whole pipeline, one stage per module: text → AST → IR → checked IR → plan → Python source."""
from __future__ import annotations

from dataclasses import dataclass, replace

from lark.exceptions import VisitError

from . import check, escape, ir, lower, parse, ranks, shapes, sym, taken
from .backends import torch as torch_backend
from .errors import Span, SpecError, SpecWarning


@dataclass(frozen=True)
class Compiled:
    program: ir.Program
    plan: sym.Plan
    warnings: tuple[SpecWarning, ...]
    python: str  # the generated module
    rules: tuple = ()  # (condition code, program, plan, condition as written) per rule, for rules by shape
    conditions: tuple = ()  # the rules' conditions as IR (None: every other parameter), for the analyses
    # `rule COND refuse "why"`: (updating rules before it, condition code, why, condition as written, line)
    refusals: tuple = ()


def _internal(err: Exception, filename: str, text: str) -> SpecError:
    return SpecError(f"optdsl could not compile this spec ({type(err).__name__}: {err})", None,
                     filename=filename, source=text, hint="this is a bug in optdsl; please report it with the spec")


def compile_source(text: str, filename: str = "<spec>") -> Compiled:
    """Compile spec text to a Python module's source. Raises SpecError for any bad spec."""
    try:
        spec = parse.parse(text, filename)
        lowered, warnings = lower.lower_rules(spec)
        ranks.check(lowered, lower.refusals(spec))
        warnings = warnings + ranks.unreachable_refusals(lowered, lower.refusals(spec))
        for _, program in lowered:
            shapes.check(program)
        sym.check_work(program for _, program in lowered)  # before the analyses: what they cost is bounded
        unrolled = [r.unrolled for r in spec.rules if r.refuse is None] or [None]
        rules = []
        for cond, program in lowered:
            # a rule unrolled from a state list (optdsl/axes.py) repeats its statements' spans: each
            # warning once, at the first rule that gives it
            seen = {(w.message, w.span) for w in warnings}
            warnings = warnings + [w for w in check.check(program) if (w.message, w.span) not in seen]
            code = torch_backend.condition_code(cond, program) if cond is not None else None
            shown = ir.format_expr(cond) if cond is not None else None
            if unrolled[len(rules)] is not None:  # a rule unrolled from a state list: what it fixes, not its guard
                written, fixed = unrolled[len(rules)]
                shown = (f"{ir.format_expr(lower.rule_condition(written, spec))} " if written is not None else "") + (
                    f"(unrolled: {fixed})")
            rules.append((code, program, sym.plan(program), shown))
        program, plan = rules[0][1], rules[0][2]
        # the reason as a terminal may show it (a CR or U+2028 written as its escape): info, explain and
        # the class's error all show this text
        refusals = tuple((before, torch_backend.condition_code(cond, program), escape.visible(why), ir.format_expr(cond),
                          span.line)
                         for before, cond, why, span in lower.refusals(spec))
        python = torch_backend.render(plan, text, filename, tuple((r[0], r[2], r[3]) for r in rules), refusals)
        taken.check(python, spec)  # the module's own top-level names, read from it
    except SpecError as err:
        raise err.located(filename, text) from None
    except (RecursionError, VisitError) as err:
        if isinstance(err, VisitError) and not isinstance(err.orig_exc, RecursionError):
            raise _internal(err, filename, text) from err
        lines = text.split("\n")  # point at the longest line, the likeliest culprit
        line = max(range(len(lines)), key=lambda i: len(lines[i].split("#")[0])) + 1
        raise SpecError("the spec is nested too deeply to compile", Span(line, 1, line, len(lines[line - 1]) + 1),
                        filename=filename, source=text, hint="split long expressions into locals") from None
    except Exception as err:  # a bug in optdsl: still one error type, saying so
        raise _internal(err, filename, text) from err
    located = tuple(replace(w, filename=filename, source=text) for w in warnings)
    many = len(rules) > 1 or bool(refusals)  # a refusal picks among rules too
    return Compiled(program, plan, located, python, tuple(rules) if many else (),
                    tuple(cond for cond, _ in lowered) if many else (), refusals)
