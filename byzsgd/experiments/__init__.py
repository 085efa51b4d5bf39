"""Grids of deployments (``grid``) and their plots and tables (``report``)."""
