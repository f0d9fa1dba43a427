"""Hypothesis profiles: `make test` draws the same examples on every run, so a red result
is reproducible from the commit alone; `make test-all` explores new random examples."""

import os

from hypothesis import settings

settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("SHARPSCOPE_HYPOTHESIS", "repeatable"))
