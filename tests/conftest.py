"""Shared fixtures: each lives in ``tests/fixtures/<topic>.py`` and is registered here."""

pytest_plugins = [
    "tests.fixtures.net",
    "tests.fixtures.node",
    "tests.fixtures.orthanc",
    "tests.fixtures.postgres",
    "tests.fixtures.dcmtk",
    "tests.fixtures.tiny_model",
]
