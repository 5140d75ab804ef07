"""The reference for W3: a plain loopback TCP copy of the same number of bytes (nothing we train with)."""

from __future__ import annotations

import socket
import threading
import time

CHUNK = 1 << 20


def _sink(server: socket.socket, nbytes: int, repeats: int) -> None:
    connection, _ = server.accept()
    with connection:
        buffer = bytearray(CHUNK)
        for _ in range(repeats):
            received = 0
            while received < nbytes:
                got = connection.recv_into(buffer, min(CHUNK, nbytes - received))
                if not got:
                    return
                received += got
            connection.sendall(b"k")


def loopback_copy_seconds(nbytes: int, repeats: int) -> list[float]:
    """Seconds to send ``nbytes`` over a 127.0.0.1 TCP connection (until the receiver acknowledges), per repeat."""
    payload = memoryview(bytes(nbytes))
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        thread = threading.Thread(target=_sink, args=(server, nbytes, repeats), daemon=True)
        thread.start()
        seconds = []
        with socket.create_connection(server.getsockname()) as client:
            for _ in range(repeats):
                started = time.perf_counter()
                client.sendall(payload)
                client.recv(1)
                seconds.append(time.perf_counter() - started)
        thread.join(timeout=10)
    return seconds
