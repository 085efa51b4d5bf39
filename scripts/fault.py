#!/usr/bin/env python3
"""``scripts/fault.py RUN_DIR ACTION ...``: the same as ``byzsgd-fault`` (byzsgd.deploy.faults),
for a checkout without an installed console script."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from byzsgd.deploy.faults import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
