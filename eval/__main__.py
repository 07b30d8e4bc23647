"""``python -m stepdistill.eval fid A B``."""

import sys

from .cli import main

sys.exit(main())
