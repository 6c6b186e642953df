"""PyInstaller entry point of the onefile binary (named so that its errors say ct-appliance)."""

import sys

from appliance.cli import main

if __name__ == "__main__":
    sys.exit(main())
