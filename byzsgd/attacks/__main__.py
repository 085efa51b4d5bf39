"""``python -m byzsgd.attacks``: the attack catalog, each attack with its roles, needs,
arguments and defaults (what ``--attack`` / ``--attack_args`` accept)."""
from byzsgd.attacks import catalog

print(catalog.describe())
