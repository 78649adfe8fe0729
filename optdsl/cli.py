"""The `optdsl` command: wires each subcommand to the module that does its work."""
from __future__ import annotations

import argparse
import builtins
import sys
from pathlib import Path

from . import __version__, console
from .build import BuildError, no_such_spec, read_spec, resolve_spec, spec_files
from .errors import SpecError
from .escape import visible


def print(*values, **kwargs) -> None:  # noqa: A001 - every line the commands print
    """builtins.print with every character a terminal would obey escaped (optdsl.escape.visible): a file
    name or a docstring in a report cannot drive the terminal."""
    builtins.print(*(visible(str(v)) for v in values), **kwargs)


# Each command imports what it needs (SymPy, Lark, torch) when it runs: `optdsl --help` and a
# mistyped command answer at once.

EPILOG = """examples:
  optdsl new MyAdam                scaffold specs/my_adam.opt, a commented spec that compiles
  optdsl build specs/              regenerate generated/ from every spec
  optdsl check specs/adamw.opt     parse and check, print warnings, write nothing
  optdsl explain specs/adamw.opt   the update rule as math and what SymPy proves about it
  optdsl equiv specs/adam.opt specs/adamw.opt --assume wd=0.1
                                   prove two specs the same optimizer, or show where they differ
  optdsl plot adam sgd --function rosenbrock -o rosenbrock.png
                                   draw trajectories (or --task charlm: loss curves)
  optdsl info specs/adafactor.opt --shape 4096x4096
                                   state memory per parameter of that shape

`optdsl COMMAND --help` says more about each command.
"""

BUILD_EPILOG = """examples:
  optdsl build specs/              regenerate generated/ from every spec
  optdsl build specs/ -o out/      write somewhere else
  optdsl build specs/lion.opt      one spec only

A failing spec is reported with file, line and column; its old output and every other
output stay untouched, and the command exits 1. So are a path that does not exist, a folder
with no .opt file, an output folder that cannot be written (read-only, full) and one that
another build is writing (it holds a lock on the folder OUT/): one line, exit 1.
"""

CHECK_EPILOG = """examples:
  optdsl check specs/              every spec: ok, or its warnings
  optdsl check specs/adamw.opt     one spec
"""

EXPLAIN_EPILOG = """examples:
  optdsl explain specs/adamw.opt
  optdsl explain specs/adamw.opt --latex
"""

NEW_EPILOG = """examples:
  optdsl new MyAdam                      write specs/my_adam.opt from a commented template
  optdsl new my_lion --from specs/lion.opt
                                         start from an existing spec (class renamed to MyLion)
  optdsl new Sophia --from adamw -o experiments/
                                         a spec of specs/ by name, written to experiments/sophia.opt

An existing file is never overwritten.
"""

PLOT_EPILOG = """examples:
  optdsl plot specs/sgd.opt specs/adam.opt --function quadratic -o quadratic.svg
  optdsl plot sgd adam lion --function rosenbrock --steps 500 --hyper lion.lr=3e-4 -o rosenbrock.png
  optdsl plot sgd adam --task charlm --hyper sgd.lr=0.5 --hyper sgd.momentum=0.9 -o charlm.png
  optdsl plot adam --function saddle --task charlm -o both.png      one panel each

Functions (trajectories from a fixed start, float64): rosenbrock, saddle, quadratic.
Tasks (loss per step, CPU, fixed seed): charlm, a character-level MLP trained on the
opening of Alice in Wonderland (shipped with optdsl).
Each function and task sets lr for specs that have one, unless --hyper does.
"""

INFO_EPILOG = """examples:
  optdsl info specs/adafactor.opt --shape 4096x4096
  optdsl info adamw --shape 7x4200 --shards 2      per rank under FSDP2 over 2 ranks
"""

EQUIV_EPILOG = """exit status: 0 proven equivalent, 1 counterexample found, 2 undecided (not proven, no
counterexample in the samples), 3 error (bad spec, unknown name, assumption out of range).

examples:
  optdsl equiv specs/adamw.opt my_adamw.opt
  optdsl equiv specs/adam.opt tests/specs/equiv/rmsprop_bc.opt --assume amsgrad=0 --assume b1=0 \\
               --assume wd=0 --map b2=alpha --map v=sq
"""


def _compile_spec(spec: str):
    """The compiled spec of a path or a spec's name; ValueError (with the names there are) if neither,
    or if it cannot be read."""
    from .pipeline import compile_source
    path = resolve_spec(spec)
    if not path.exists() and path.suffix == "":
        raise ValueError(no_such_spec(spec))
    try:
        text = read_spec(path)
    except BuildError as err:
        raise ValueError(str(err)) from None
    return compile_source(text, path.as_posix())


def _specs_given(command: str, spec: str) -> Path | None:
    """A folder, a file, or a spec's name resolved; None (said why) for a name that is no spec.
    (A missing path is spec_files' to report.)"""
    path = resolve_spec(spec)
    if path.exists() or path.suffix or len(path.parts) != 1:
        return path
    console.show(f"optdsl {command}: error: {no_such_spec(spec)}")
    return None


def _build(args) -> int:
    from .build import build
    args.specs = _specs_given("build", args.specs)
    if args.specs is None:
        return 1
    try:
        with console.progress(len(spec_files(Path(args.specs))), "building") as working_on:
            report = build(args.specs, args.out, working_on)
    except BuildError as err:  # nothing to build, or an output folder it cannot write: one line
        console.show(f"optdsl build: error: {err}")
        return 1
    for w in report.warnings:
        console.show(w)
    for e in report.errors:
        console.show(e if isinstance(e, SpecError) else f"optdsl build: error: {e}")
    print(f"optdsl: {len(report.written)} written, {len(report.unchanged)} unchanged, "
          f"{len(report.removed)} removed, {len(report.errors)} failed, {len(report.warnings)} warnings")
    return 0 if report.ok else 1


def _check(args) -> int:
    from .pipeline import compile_source
    specs = _specs_given("check", args.specs)
    if specs is None:
        return 1
    failed = 0
    folder = Path(specs) if Path(specs).is_dir() else None
    try:
        specs = spec_files(specs)
    except BuildError as err:
        console.show(f"optdsl check: error: {err}")
        return 1
    for spec in specs:
        try:
            compiled = compile_source(read_spec(spec, folder), spec.as_posix())
        except SpecError as err:
            console.show(err)
            failed += 1
            continue
        except BuildError as err:
            console.show(f"optdsl check: error: {err}")
            failed += 1
            continue
        status = f"{len(compiled.warnings)} warning(s)" if compiled.warnings else "ok"
        print(f"{spec.as_posix()}: {status}")
        for w in compiled.warnings:
            console.show(w, sys.stdout)
    return 1 if failed else 0


def _name_values(items: list[str] | None, option: str) -> dict[str, str]:
    pairs = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not (sep and name.strip() and value.strip()):
            raise ValueError(f"{option} expects NAME=VALUE, got {item!r}")
        pairs[name.strip()] = value.strip()
    return pairs


def _explain(args) -> int:
    from .explain import explain, report
    try:
        compiled = _compile_spec(args.spec)
    except SpecError as err:
        console.show(err)
        return 1
    except OSError as err:
        print(f"optdsl: cannot read {args.spec}: {err.strerror}", file=sys.stderr)
        return 1
    except ValueError as err:  # neither a file nor a spec's name
        print(f"optdsl explain: error: {err}", file=sys.stderr)
        return 1
    try:
        explanation = explain(compiled)
    except ValueError as err:  # a spec beyond what the analyses model: say so
        print(f"optdsl explain: {err}", file=sys.stderr)
        return 1
    print(report(explanation, latex=args.latex))
    return 0


def _equiv(args) -> int:
    from .equiv import equivalent, report
    try:
        assume = {}
        for name, value in _name_values(args.assume, "--assume").items():
            try:
                assume[name] = float(value)
            except ValueError:
                raise ValueError(f"--assume {name}={value}: not a number") from None
        mapping = _name_values(args.map, "--map")
        specs = [_compile_spec(f) for f in (args.a, args.b)]
    except SpecError as err:
        console.show(err)
        return 3
    except (OSError, ValueError) as err:  # an unreadable file, a malformed option
        print(f"optdsl equiv: error: {err}", file=sys.stderr)
        return 3
    verdict = equivalent(*specs, assume=assume, mapping=mapping, samples=args.samples)
    print(report(verdict, args.a, args.b), file=sys.stderr if verdict.error else sys.stdout)
    return verdict.exit_code


def _info(args) -> int:
    from .info import parse_shape, report
    try:
        shape = parse_shape(args.shape)
        compiled = _compile_spec(args.spec)
        if args.shards < 1:
            raise ValueError(f"--shards must be at least 1, got {args.shards}")
        print(report(compiled, shape, args.shards))
    except SpecError as err:
        console.show(err)
        return 1
    except (OSError, ValueError) as err:
        console.show(f"optdsl info: error: {err}")
        return 1
    return 0


def _new(args) -> int:
    from .scaffold import ScaffoldError, new_spec
    try:
        path = new_spec(args.name, args.out, args.source)
    except SpecError as err:  # the --from spec is broken
        console.show(err)
        return 1
    except (ScaffoldError, BuildError, OSError) as err:
        console.show(f"optdsl new: error: {err}")
        return 1
    print(f"wrote {path.as_posix()}; next: optdsl check {path.as_posix()}, then optdsl build {path.parent.as_posix()}/")
    return 0


def _plot(args) -> int:
    from .plot import PlotError, plot
    items = len(args.specs) * (len(args.function or []) + len(args.task or []) or 1)
    try:
        with console.progress(items, "plotting") as working_on:
            out = plot(args.specs, args.out, args.function or [], args.task or [], args.steps, args.hyper or [],
                       working_on)
    except SpecError as err:
        console.show(err)
        return 1
    except (PlotError, OSError) as err:
        console.show(f"optdsl plot: error: {err}")
        return 1
    print(f"wrote {out.as_posix()}")
    return 0


def _subcommand(sub, name: str, help: str, epilog: str, run) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".", epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optdsl", description="Compile optimizer specs to PyTorch.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"optdsl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = _subcommand(sub, "build", "generate one Python module per spec", BUILD_EPILOG, _build)
    b.add_argument("specs", help="a folder of .opt files, one file, or a spec's name (adamw)")
    b.add_argument("-o", "--out", default="generated", help="output folder (default: generated/)")

    c = _subcommand(sub, "check", "parse and check specs, print warnings, write nothing", CHECK_EPILOG, _check)
    c.add_argument("specs", help="a folder of .opt files, one file, or a spec's name (adamw)")

    x = _subcommand(sub, "explain", "the update rule as math, its properties and domain risks", EXPLAIN_EPILOG,
                    _explain)
    x.add_argument("spec", help="one .opt file, or a spec's name (adamw)")
    x.add_argument("--latex", action="store_true", help="print the update rule as LaTeX")

    e = _subcommand(sub, "equiv", "prove two specs compute the same step, or find a counterexample",
                    EQUIV_EPILOG, _equiv)
    e.add_argument("a", help="spec A (a .opt file, or a spec's name)")
    e.add_argument("b", help="spec B (a .opt file, or a spec's name)")
    e.add_argument("--assume", action="append", metavar="NAME=VALUE",
                   help="fix a hyperparameter in both specs (repeatable), e.g. --assume b1=0")
    e.add_argument("--map", action="append", metavar="A_NAME=B_NAME",
                   help="rename a hyperparameter or state of A to B's name (repeatable)")
    e.add_argument("--samples", type=int, default=200, help="random points tried for a counterexample (default 200)")

    n = _subcommand(sub, "new", "scaffold a new spec: commented, and it compiles as it stands", NEW_EPILOG, _new)
    n.add_argument("name", help="the optimizer's name: MyAdam or my_adam (class MyAdam, file my_adam.opt)")
    n.add_argument("--from", dest="source", metavar="SPEC",
                   help="start from this spec (a .opt file, or a spec's name: one in ./specs, or shipped) instead of the template")
    n.add_argument("-o", "--out", default="specs", metavar="DIR", help="folder to write to (default: specs/)")

    from .plot import FUNCTIONS, TASKS  # only names: matplotlib is imported when a plot is drawn
    pl = _subcommand(sub, "plot", "draw trajectories on 2-D test functions and loss curves on a tiny task",
                     PLOT_EPILOG, _plot)
    pl.add_argument("specs", nargs="+", metavar="SPEC", help=".opt files, or names of specs (in ./specs, or shipped)")
    pl.add_argument("--function", action="append", choices=list(FUNCTIONS),
                    help="a 2-D test function (repeatable; default rosenbrock when no --task is given)")
    pl.add_argument("--task", action="append", choices=list(TASKS), help="a training task for loss curves")
    pl.add_argument("--steps", type=int, help="optimizer steps (default 200 on functions, 120 on charlm)")
    pl.add_argument("--hyper", action="append", metavar="[SPEC.]NAME=VALUE",
                    help="a hyperparameter for every spec that has it, or for one (sgd.momentum=0.9); repeatable")
    pl.add_argument("-o", "--out", required=True, metavar="FILE", help="the picture to write: .png or .svg")

    i = _subcommand(sub, "info", "state memory per parameter of a given shape", INFO_EPILOG, _info)
    i.add_argument("spec", help="one .opt file, or a spec's name (adafactor)")
    i.add_argument("--shape", default="4096x4096", help="the parameter's shape (default 4096x4096)")
    i.add_argument("--shards", type=int, default=1,
                   help="also the bytes per rank when FSDP2 splits the parameter by rows over this many ranks")
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:  # `optdsl explain adam | head`: the reader has gone, nothing to say
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush goes nowhere
        return 1


if __name__ == "__main__":
    sys.exit(main())
