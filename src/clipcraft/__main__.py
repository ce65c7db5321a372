"""``python -m clipcraft``: the same command line as ``clipcraft``."""

import sys

from clipcraft.cli import main

sys.exit(main())
