"""``python -m bench``: the benchmark runner (bench/run.py)."""

import sys

from .run import main

sys.exit(main())
