"""`python -m tunelab` (what `torchrun -m tunelab train CONFIG` runs on every rank)."""

import sys

from .cli import main

sys.exit(main())
