"""free_port: ports a server can still bind after other processes have opened connections."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from services.cli import stack


def test_ports_come_from_below_the_ephemeral_range_and_are_never_handed_out_twice() -> None:
    low = stack._ephemeral_low()
    ports = [stack.free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(stack._LOWEST_PORT <= p < low for p in ports)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", ports[-1]))


def test_a_port_in_use_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", stack.free_port()))
        held.listen()
        taken = int(held.getsockname()[1])
        spare = stack.free_port()
        stack._handed_out.discard(spare)
        draws: Iterator[int] = iter([taken, spare])

        class Draws:
            def randrange(self, start: int, stop: int) -> int:
                return next(draws)

        monkeypatch.setattr("services.cli.stack.random.SystemRandom", Draws)
        assert not stack._bindable(taken)
        assert stack.free_port() == spare
