"""The test bed itself: rate limits in place, NAT blocks inbound connections, a cut link, and nothing left behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.netns import NetBed, leftovers, unavailable_reason

LISTEN = (
    "import socket,sys\n"
    "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('0.0.0.0', 7000)); s.listen()\n"  # inside the namespace: its own addresses only
    "print('listening', flush=True); s.settimeout(30)\n"
    "while True:\n"
    "    c, _ = s.accept(); c.close()\n"
)


def listen(bed: NetBed, name: str) -> subprocess.Popen:
    process = subprocess.Popen(bed.command(name, [sys.executable, "-c", LISTEN]), stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "listening"
    return process


def test_bed_builds_nat_rate_limits_and_cuts_and_removes_everything():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with NetBed() as bed:
        bed.add_peer("a", rate_mbit=20)
        bed.add_router("r1", rate_mbit=20)
        bed.add_peer("n", behind="r1")
        assert "tbf" in bed.qdisc("a") and "20Mbit" in bed.qdisc("a")
        servers = [listen(bed, "a"), listen(bed, "n")]
        try:
            assert bed.can_connect("n", bed.nodes["a"].ip, 7000)  # the NAT'd peer dials out
            assert not bed.can_connect("a", bed.nodes["n"].ip, 7000)  # nobody dials in
            assert not bed.can_connect("a", bed.nodes["r1"].ip, 7000)  # not even to its router's public address
            bed.cut("a")
            assert not bed.can_connect("n", bed.nodes["a"].ip, 7000, timeout=1.0)
            bed.restore("a")
            assert bed.can_connect("n", bed.nodes["a"].ip, 7000)
        finally:
            for server in servers:
                server.kill()
                server.wait()
        assert leftovers()["namespaces"]
    assert leftovers() == {"namespaces": [], "links": [], "routes": []}


def test_a_crashed_beds_leftovers_are_removed_by_the_next_one():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    crashed = NetBed()
    crashed.__enter__()
    crashed.add_peer("a", rate_mbit=5)
    crashed._lock_file.close()  # the process "died": the kernel drops its lock, its namespaces and links stay
    crashed._lock_file = None
    assert leftovers()["namespaces"] == [crashed.nodes["a"].namespace]
    with NetBed() as bed:
        assert leftovers()["namespaces"] == []  # removed on entry
        assert not any(crashed.id in link for link in leftovers()["links"])
        assert bed.bridge in leftovers()["links"]
    assert leftovers() == {"namespaces": [], "links": [], "routes": []}
