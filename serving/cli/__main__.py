"""``python -m serving.cli``."""

import sys

from serving.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
