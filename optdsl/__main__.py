"""`python -m optdsl ...`: the optdsl command."""
import sys

from .cli import main

sys.exit(main())
