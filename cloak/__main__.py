"""``python -m cloak``: the same as the ``cloak`` command."""

import sys

from cloak.cli import main

if __name__ == "__main__":
    sys.exit(main())
