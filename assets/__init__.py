"""Dagster definitions over `pipeline/`: assets, checks, resources, the job and its schedule."""
