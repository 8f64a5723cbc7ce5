"""Reusable test helpers: a tiny model factory and an engine-process fixture (engineer B)."""
