"""Alias of ``lorakit.app.cli`` so that ``python -m lorakit.cli`` and old scripts keep working."""

from lorakit.app.cli import main

if __name__ == "__main__":
    import sys

    sys.exit(main())
