"""The `optdsl` command: build, check and compare specs."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .build import build, spec_files
from .equiv import equivalent, report
from .errors import SpecError
from .pipeline import compile_source

EPILOG = """examples:
  optdsl build specs/              regenerate generated/ from every spec
  optdsl build specs/ -o out/      write somewhere else
  optdsl check specs/adamw.opt     parse and check, print warnings, write nothing
  optdsl equiv specs/adam.opt specs/adamw.opt --assume wd=0.1
                                   prove two specs the same optimizer, or show where they differ
"""

EQUIV_EPILOG = """exit status: 0 proven equivalent, 1 counterexample found, 2 undecided (not proven, no
counterexample in the samples), 3 error (bad spec, unknown name, assumption out of range).

examples:
  optdsl equiv specs/adamw.opt my_adamw.opt
  optdsl equiv specs/adam.opt tests/specs/equiv/rmsprop_bc.opt --assume b1=0 --assume wd=0 \\
               --map b2=alpha --map v=sq
"""


def _build(args) -> int:
    report = build(args.specs, args.out)
    for w in report.warnings:
        print(w, file=sys.stderr)
    for e in report.errors:
        print(e, file=sys.stderr)
    print(f"optdsl: {len(report.written)} written, {len(report.unchanged)} unchanged, "
          f"{len(report.removed)} removed, {len(report.errors)} failed, {len(report.warnings)} warnings")
    return 0 if report.ok else 1


def _check(args) -> int:
    failed = 0
    for spec in spec_files(Path(args.specs)):
        try:
            compiled = compile_source(spec.read_text(encoding="utf-8"), spec.as_posix())
        except SpecError as err:
            print(err, file=sys.stderr)
            failed += 1
            continue
        status = f"{len(compiled.warnings)} warning(s)" if compiled.warnings else "ok"
        print(f"{spec.as_posix()}: {status}")
        for w in compiled.warnings:
            print(w)
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
        compiled = compile_source(Path(args.spec).read_text(encoding="utf-8"), Path(args.spec).as_posix())
    except SpecError as err:
        print(err, file=sys.stderr)
        return 1
    except OSError as err:
        print(f"optdsl: cannot read {args.spec}: {err.strerror}", file=sys.stderr)
        return 1
    try:
        explanation = explain(compiled)
    except ValueError as err:  # a spec beyond what the analyses model: say so
        print(f"optdsl explain: {err}", file=sys.stderr)
        return 1
    print(report(explanation, latex=args.latex))
    return 0


def _equiv(args) -> int:
    try:
        assume = {}
        for name, value in _name_values(args.assume, "--assume").items():
            try:
                assume[name] = float(value)
            except ValueError:
                raise ValueError(f"--assume {name}={value}: not a number") from None
        mapping = _name_values(args.map, "--map")
        specs = [compile_source(Path(f).read_text(encoding="utf-8"), f) for f in (args.a, args.b)]
    except SpecError as err:
        print(err, file=sys.stderr)
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
        compiled = compile_source(Path(args.spec).read_text(encoding="utf-8"), Path(args.spec).as_posix())
        print(report(compiled, shape))
    except SpecError as err:
        print(err, file=sys.stderr)
        return 1
    except (OSError, ValueError) as err:
        print(f"optdsl info: error: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optdsl", description="Compile optimizer specs to PyTorch.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="generate one Python module per spec", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("specs", help="a folder of .opt files, or one file")
    b.add_argument("-o", "--out", default="generated", help="output folder (default: generated/)")
    b.set_defaults(run=_build)
    c = sub.add_parser("check", help="parse and check specs, print warnings, write nothing")
    c.add_argument("specs", help="a folder of .opt files, or one file")
    c.set_defaults(run=_check)
    x = sub.add_parser("explain", help="the update rule as math, its properties and domain risks",
                       epilog="example:\n  optdsl explain specs/adamw.opt --latex",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    x.add_argument("spec", help="one .opt file")
    x.add_argument("--latex", action="store_true", help="print the update rule as LaTeX")
    x.set_defaults(run=_explain)
    e = sub.add_parser("equiv", help="prove two specs compute the same step, or find a counterexample",
                       epilog=EQUIV_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("a", help="spec A (.opt file)")
    e.add_argument("b", help="spec B (.opt file)")
    e.add_argument("--assume", action="append", metavar="NAME=VALUE",
                   help="fix a hyperparameter in both specs (repeatable), e.g. --assume b1=0")
    e.add_argument("--map", action="append", metavar="A_NAME=B_NAME",
                   help="rename a hyperparameter or state of A to B's name (repeatable)")
    e.add_argument("--samples", type=int, default=200, help="random points tried for a counterexample (default 200)")
    e.set_defaults(run=_equiv)
    i = sub.add_parser("info", help="state memory per parameter of a given shape",
                       epilog="example:\n  optdsl info specs/adafactor.opt --shape 4096x4096",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("spec", help="one .opt file")
    i.add_argument("--shape", default="4096x4096", help="the parameter's shape (default 4096x4096)")
    i.set_defaults(run=_info)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
