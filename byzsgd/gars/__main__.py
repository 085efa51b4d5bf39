"""``python -m byzsgd.gars``: every aggregation rule and pre-aggregation, with its bound, its
keyword parameters (``--gar_args``, ``--pre_agg name:k=v``) and its reference."""
from byzsgd.gars import registry

print(registry.describe())
