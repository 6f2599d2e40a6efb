"""Tiny worlds the tests (and scripts/equivalence.py) build in code: models of every family, their experts,
datasets saved to disk, and small Lightning callbacks. Nothing here downloads anything."""
