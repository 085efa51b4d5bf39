"""``python -m byzsgd.experiment``: experiment grids (the code lives in :mod:`byzsgd.experiments.grid`)."""
from byzsgd.experiments.grid import main

__all__ = ["main"]

if __name__ == "__main__":
    import sys

    sys.exit(main())
