"""python -m harness.trial STUDY --cell CELL: see harness/trial/cli.py."""

import sys

from harness.trial.cli import main

sys.exit(main())
