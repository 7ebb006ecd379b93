"""`python -m plan ...`: the same as `folio plan ...`."""

import sys

from .cli import main

sys.exit(main())
