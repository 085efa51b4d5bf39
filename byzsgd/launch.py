"""``python -m byzsgd.launch``: the one-machine launcher (the code lives in :mod:`byzsgd.deploy.launch`)."""
from byzsgd.deploy.launch import main

__all__ = ["main"]

if __name__ == "__main__":
    import sys

    sys.exit(main())
