"""``python -m byzsgd.trainer``: Garfield's ByzSGD ``trainer.py`` interface (the code lives in
:mod:`byzsgd.deploy.garfield`)."""
from byzsgd.deploy.garfield import main

__all__ = ["main"]

if __name__ == "__main__":
    code = main()  # first: --help and flag errors must not import torch (byzsgd.roles does)
    from byzsgd.roles.common import exit_now

    exit_now(code)
