"""``python -m microstructures``: see microstructures/cli.py."""
import sys

from .cli import main

sys.exit(main())
