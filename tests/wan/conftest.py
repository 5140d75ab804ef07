"""The network test bed fixture: skips (with the reason) only when namespaces cannot be created here."""

from __future__ import annotations

import pytest

from tests.support.netns import NetBed, unavailable_reason


@pytest.fixture
def netbed():
    """A fresh :class:`~tests.support.netns.NetBed`; everything it made is removed afterwards, also on failure."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with NetBed() as bed:
        yield bed
