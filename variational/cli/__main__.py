"""`python -m variational.cli`: the same as the `variational` command."""

import sys

from variational.cli import main

if __name__ == "__main__":
    sys.exit(main())
