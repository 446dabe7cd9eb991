"""Shutdown: under load no request is cancelled or lost, a silent connection cannot hold
the process, and a second signal stops it at once."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections import Counter

import grpc
from helpers import send_until_refused

from serving.launcher import start_server


def keep_sending(target: str, outcomes: Counter, lock: threading.Lock, stop: threading.Event):
    """One client with a connection of its own: `send_until_refused`."""
    with grpc.insecure_channel(target) as channel:
        send_until_refused(channel, outcomes, lock, stop)


def test_sigterm_under_load_cancels_or_loses_nothing(model_repository, tmp_path):
    server = start_server(model_repository, tmp_path, "--shutdown-timeout", "20")
    outcomes, lock, stop = Counter(), threading.Lock(), threading.Event()
    clients = [
        threading.Thread(target=keep_sending, args=(server.target, outcomes, lock, stop))
        for _ in range(16)
    ]
    for client in clients:
        client.start()
    time.sleep(1.0)
    with lock:
        before = outcomes["OK"]
    server.process.send_signal(signal.SIGTERM)
    try:
        assert server.process.wait(timeout=30) == 0
    finally:
        stop.set()
        for client in clients:
            client.join(30)
    print(f"\nanswers under load through a SIGTERM: {dict(outcomes)} ({before} OK before it)")
    assert before > 0 and outcomes["OK"] > before, "served before and during the drain"
    assert set(outcomes) <= {"OK", "UNAVAILABLE"}, outcomes  # nothing CANCELLED
    assert outcomes["UNAVAILABLE"] <= len(clients), "each client was refused once, then left"
    assert "shutting down" in server.log() or outcomes["UNAVAILABLE"] == 0


def silent_connection(port: int) -> socket.socket:
    """A TCP connection that never sends a byte (not even HTTP/2's preface)."""
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def test_a_silent_connection_does_not_hold_up_shutdown(model_repository, tmp_path):
    server = start_server(model_repository, tmp_path, "--drain-quiet-period", "0.1")
    with silent_connection(server.port):
        start = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
        seconds = time.monotonic() - start
    print(f"\nstopped {seconds:.2f} s after SIGTERM with a silent connection open")
    assert seconds < 10, "the handshake timeout (5 s) bounds it"


def test_a_second_signal_stops_at_once(model_repository, tmp_path):
    server = start_server(model_repository, tmp_path, "--shutdown-timeout", "60")
    with silent_connection(server.port):
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        start = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
        seconds = time.monotonic() - start
    print(f"\nstopped {seconds:.2f} s after the second SIGTERM")
    assert seconds < 3
    assert "second SIGTERM" in server.log()
