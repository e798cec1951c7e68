"""Shared fixtures: each lives in ``tests/fixtures/<topic>.py`` and is registered here."""

import os

from hypothesis import settings

pytest_plugins = [
    "tests.fixtures.net",
    "tests.fixtures.node",
    "tests.fixtures.orthanc",
    "tests.fixtures.postgres",
    "tests.fixtures.dcmtk",
    "tests.fixtures.tiny_model",
]

# The suite is CI's gate, so its property tests draw the same examples on every run
# (``derandomize``): a failure reproduces, and a run does not fail on an input no earlier run
# tried. Exploration with fresh random inputs is a separate run:
# ``HYPOTHESIS_PROFILE=explore python -m pytest tests/test_fuzz_*.py`` (what found the
# unknown-VR case of test_fuzz_header.py).
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
