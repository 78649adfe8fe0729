"""Run the optdsl command from a checkout: `python cli.py build specs/`."""
import sys

from optdsl.cli import main

if __name__ == "__main__":
    sys.exit(main())
