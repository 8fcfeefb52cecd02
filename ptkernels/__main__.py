"""`python -m ptkernels ...` runs the `ptkernels` command (see ptkernels/cli.py)."""

import sys

from ptkernels.cli import main

sys.exit(main())
