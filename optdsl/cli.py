"""The `optdsl` command: build and check specs."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .build import build, spec_files
from .errors import SpecError
from .pipeline import compile_source

EPILOG = """examples:
  optdsl build specs/              regenerate generated/ from every spec
  optdsl build specs/ -o out/      write somewhere else
  optdsl check specs/adamw.opt     parse and check, print warnings, write nothing
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
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
