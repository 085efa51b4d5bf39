"""The roles: what a parameter server and a worker do, per mode, correct or Byzantine, over the
transport (:mod:`byzsgd.net`).  Which module owns what: docs/design.md §2 (the map)."""
