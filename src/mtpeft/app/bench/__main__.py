"""``python -m mtpeft.app.bench``: the same as ``mtpeft bench``."""

import sys

from .cli import main

sys.exit(main())
