"""PyInstaller entry point of the onefile binary: the same `main` as the console script."""

import sys

from appliance.cli import main

if __name__ == "__main__":
    sys.exit(main())
