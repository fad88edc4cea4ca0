"""`python -m genesis.evaluate`: see genesis.evaluate.cli."""

import sys

from genesis.evaluate.cli import main

sys.exit(main())
