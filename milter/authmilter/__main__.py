"""Allow ``python -m authmilter``."""

from __future__ import annotations

import sys

from authmilter.cli import main

sys.exit(main())
