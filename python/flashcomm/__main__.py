"""``python -m flashcomm``: the command line (flashcomm_cli)."""

import sys

from flashcomm_cli import main

sys.exit(main())
