"""`python -m tunelab` = the `tunelab` command."""

import sys

from .cli import main

sys.exit(main())
