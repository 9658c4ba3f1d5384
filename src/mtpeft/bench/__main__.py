"""``python -m mtpeft.bench``: the same as ``mtpeft bench``."""

import sys

from .cli import main

sys.exit(main())
