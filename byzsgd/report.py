"""``python -m byzsgd.report``: plots and tables of an experiment grid (the code lives in :mod:`byzsgd.experiments.report`)."""
from byzsgd.experiments.report import main

__all__ = ["main"]

if __name__ == "__main__":
    import sys

    sys.exit(main())
