"""Tests for collab_core.dht with real hivemind DHTs on loopback addresses."""

from __future__ import annotations

import multiprocessing as mp
import shlex
import socket
import time
from collections.abc import Iterator

import hivemind
import pytest
from hivemind.utils.timed_storage import get_dht_time

from collab_core.dht import DHTStartupError, join_hint, start_dht
from collab_core.settings import CollaborativeSettings

LOOPBACK = "/ip4/127.0.0.1/tcp/0"

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def dhts() -> Iterator[list[hivemind.DHT]]:
    """Collects every DHT a test starts and shuts all of them down afterwards, also when the test fails."""
    started: list[hivemind.DHT] = []
    yield started
    for dht in started:
        dht.shutdown()


def settings_from_hint(hint: str, **overrides: object) -> CollaborativeSettings:
    """Parse the ``COLLAB_*=...`` assignments printed in a join hint and build settings from them."""
    env: dict[str, str] = {}
    for token in shlex.split(assignment_line(hint)):
        key, value = token.split("=", 1)
        env[key] = value
    assert env, f"no COLLAB_ variables in hint: {hint!r}"
    return CollaborativeSettings.resolve(env=env, **overrides)


def assignment_line(hint: str) -> str:
    """The indented ``COLLAB_...=...`` line of a join hint, i.e. what a user copies into their shell."""
    lines = [line for line in hint.splitlines() if line.startswith("  COLLAB_")]
    assert len(lines) == 1, f"expected exactly one assignment line in hint: {hint!r}"
    return lines[0]


def dead_peer_address() -> str:
    """A well-formed multiaddr with a real peer id whose port is closed (its DHT has been shut down)."""
    dht = hivemind.DHT(host_maddrs=[LOOPBACK], start=True)
    try:
        address = str(dht.get_visible_maddrs()[0])
    finally:
        dht.shutdown()
    return address


def running_dht_processes() -> list[mp.Process]:
    return [process for process in mp.active_children() if isinstance(process, hivemind.DHT)]


def test_start_dht_returns_running_dht_and_hint(dhts: list[hivemind.DHT], capsys: pytest.CaptureFixture[str]) -> None:
    settings = CollaborativeSettings(run_id="unit-run", host_maddrs=[LOOPBACK])
    dht, hint = start_dht(settings)
    dhts.append(dht)

    assert dht.is_alive()
    maddrs = [str(maddr) for maddr in dht.get_visible_maddrs()]
    assert maddrs and all(address in hint for address in maddrs)
    assert "COLLAB_INITIAL_PEERS=" in hint and "COLLAB_RUN_ID=unit-run" in hint
    assert "0.0.0.0" not in assignment_line(hint)
    assert capsys.readouterr().out.strip() == hint.strip()
    assert join_hint(dht, settings) == hint


def test_second_peer_joins_from_hint(dhts: list[hivemind.DHT], capsys: pytest.CaptureFixture[str]) -> None:
    first, _ = start_dht(CollaborativeSettings(run_id="join-test", host_maddrs=[LOOPBACK]))
    dhts.append(first)
    printed_hint = capsys.readouterr().out

    settings = settings_from_hint(printed_hint, host_maddrs=[LOOPBACK])
    assert settings.run_id == "join-test"
    assert settings.initial_peers == [str(maddr) for maddr in first.get_visible_maddrs()]
    second, _ = start_dht(settings, print_hint=False, startup_timeout=20)
    dhts.append(second)
    assert capsys.readouterr().out == ""

    expiration = get_dht_time() + 60
    assert first.store("join-test_from_first", "hello", expiration_time=expiration)
    assert second.store("join-test_from_second", "world", expiration_time=expiration)
    from_first = second.get("join-test_from_first", latest=True)
    from_second = first.get("join-test_from_second", latest=True)
    assert from_first is not None and from_first.value == "hello"
    assert from_second is not None and from_second.value == "world"


def test_reuses_running_dht(dhts: list[hivemind.DHT]) -> None:
    dht = hivemind.DHT(host_maddrs=[LOOPBACK], start=True)
    dhts.append(dht)
    returned, hint = start_dht(CollaborativeSettings(), dht=dht, print_hint=False)
    assert returned is dht
    assert str(dht.get_visible_maddrs()[0]) in hint


@pytest.mark.parametrize("started", [True, False], ids=["shut-down", "never-started"])
def test_stopped_dht_is_rejected(dhts: list[hivemind.DHT], started: bool) -> None:
    dht = hivemind.DHT(host_maddrs=[LOOPBACK], start=started)
    dhts.append(dht)
    dht.shutdown()
    with pytest.raises(DHTStartupError, match=r"not running.*run_in_background\(\).*start=True"):
        start_dht(CollaborativeSettings(), dht=dht, print_hint=False)


def test_unreachable_initial_peer_fails_fast_and_cleans_up() -> None:
    address = dead_peer_address()
    settings = CollaborativeSettings(initial_peers=[address], host_maddrs=[LOOPBACK])
    started = time.monotonic()
    with pytest.raises(DHTStartupError) as info:
        start_dht(settings, print_hint=False, startup_timeout=10)
    assert time.monotonic() - started < 15
    message = str(info.value)
    assert address in message
    assert "initial_peers" in message and "COLLAB_INITIAL_PEERS" in message
    assert "still running" in message and "reachable" in message
    assert running_dht_processes() == []


def test_silent_initial_peer_times_out_and_cleans_up() -> None:
    """A port that accepts TCP connections but never speaks libp2p: start-up must give up after startup_timeout."""
    peer_id = dead_peer_address().split("/p2p/")[1]
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        address = f"/ip4/127.0.0.1/tcp/{listener.getsockname()[1]}/p2p/{peer_id}"
        settings = CollaborativeSettings(initial_peers=[address], host_maddrs=[LOOPBACK])
        started = time.monotonic()
        with pytest.raises(DHTStartupError) as info:
            start_dht(settings, print_hint=False, startup_timeout=2)
        # startup_timeout plus hivemind's shutdown grace period (3 s) at most
        assert time.monotonic() - started < 2 + 3 + 2
    assert address in str(info.value)
    assert running_dht_processes() == []


def test_client_mode_hint_points_to_other_peers(dhts: list[hivemind.DHT], capsys: pytest.CaptureFixture[str]) -> None:
    server, server_hint = start_dht(CollaborativeSettings(host_maddrs=[LOOPBACK]), print_hint=False)
    dhts.append(server)
    client_settings = settings_from_hint(server_hint, host_maddrs=[LOOPBACK], client_mode=True)
    client, hint = start_dht(client_settings)
    dhts.append(client)

    assert "client mode" in hint and "cannot be an initial peer" in hint
    with pytest.raises(ValueError, match="No multiaddrs"):  # a client listens nowhere, host_maddrs or not
        client.get_visible_maddrs()
    assert all(address in hint for address in client_settings.initial_peers)
    assert capsys.readouterr().out.strip() == hint.strip()
