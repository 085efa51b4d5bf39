"""``python -m byzsgd.trainer``: Garfield's ByzSGD ``trainer.py`` interface (the code lives in
:mod:`byzsgd.deploy.trainer_cli`)."""
from byzsgd.deploy.trainer_cli import main

__all__ = ["main"]

if __name__ == "__main__":
    code = main()  # first: --help and flag errors must not import torch (byzsgd.roles does)
    from byzsgd.roles.process import exit_now

    exit_now(code)
