"""python -m harness.study NAME: see harness/study/cli.py."""

import sys

from harness.study.cli import main

sys.exit(main())
