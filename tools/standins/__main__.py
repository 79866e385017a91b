"""``python -m tools.standins [kind ...]``: build the stand-ins of each kind (default sd15; "all" = every kind)."""
from __future__ import annotations
import logging
import sys

from . import ALL_KINDS, ensure

logging.basicConfig(level=logging.INFO, format="%(message)s")
kinds = tuple(sys.argv[1:]) or ("sd15",)
print(ensure(ALL_KINDS if "all" in kinds else kinds))
