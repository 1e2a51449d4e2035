"""`python -m tunelab` = the `tunelab` command (what `torchrun -m tunelab train CONFIG` runs on every rank)."""

import sys

from .cli import main

sys.exit(main())
