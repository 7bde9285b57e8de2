import sys

from flashcomm.cli import main

sys.exit(main())
