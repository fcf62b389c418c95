"""The boolean environment switches: one parser (nino_fast._env.env_flag) for every NINO_FAST_* on/off variable."""

import pytest

from nino_fast._env import env_flag
from nino_fast.graph import lpe
from nino_fast.meta import _malloc


@pytest.mark.parametrize(
    "value, default, want",
    [
        (None, True, True),
        (None, False, False),
        ("", True, True),
        ("  ", False, False),
        ("0", True, False),
        (" OFF ", True, False),
        ("False", True, False),
        ("no", True, False),
        ("1", False, True),
        ("yes", False, True),
        ("On", False, True),
        ("2", False, True),
    ],
)
def test_env_flag(monkeypatch, value, default, want):
    if value is None:
        monkeypatch.delenv("NINO_FAST_TEST_FLAG", raising=False)
    else:
        monkeypatch.setenv("NINO_FAST_TEST_FLAG", value)
    assert env_flag("NINO_FAST_TEST_FLAG", default) is want


@pytest.mark.parametrize("value, want", [(None, True), ("", True), ("0", False), ("off", False), ("FALSE", False)])
def test_lpe_cache_switch(monkeypatch, value, want):
    """``NINO_FAST_LPE_CACHE=off`` (or False) turns the cache off too, not only ``0``; an explicit argument wins."""
    if value is None:
        monkeypatch.delenv("NINO_FAST_LPE_CACHE", raising=False)
    else:
        monkeypatch.setenv("NINO_FAST_LPE_CACHE", value)
    big = lpe.CACHE_MIN_NODES
    assert lpe._cache_enabled(None, big) is want
    assert lpe._cache_enabled(True, big) and not lpe._cache_enabled(False, big)
    assert not lpe._cache_enabled(None, big - 1)


def test_keep_freed_switch(monkeypatch):
    monkeypatch.setenv("NINO_FAST_KEEP_FREED", " Off ")
    assert _malloc.keep_freed_memory() is False
