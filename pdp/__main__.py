"""`python -m pdp` is the `pdp` command."""

import sys

from pdp.cli import main

sys.exit(main())
