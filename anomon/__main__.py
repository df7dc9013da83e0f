"""`python -m anomon` runs the command line."""

import sys

from anomon.cli import main

sys.exit(main())
