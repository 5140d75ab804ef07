"""Shared test set-up. Helpers live in ``tests/support/`` and are imported as ``tests.support.<module>``."""
