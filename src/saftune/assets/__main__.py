"""`python -m saftune.assets fetch ...`: the assets' command line (see `saftune.assets.cli`)."""

import sys

from saftune.assets.cli import main

sys.exit(main())
