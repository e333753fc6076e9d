"""A TCP proxy that can drop, refuse or hold connections on demand: an outage (an RPC node, a facilitator) without
touching the process behind it."""

from __future__ import annotations

import socket
import threading

from tests.hub_helpers import free_test_port


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target until an outage, and again after `mend()`: `cut()` closes every
    connection and refuses new ones; `hold()` accepts new ones and never answers (a host that black-holes); `drop()`
    closes every connection and lets new ones never connect (a host that is down: the SYN gets no answer);
    `lose_answer(marker, instead=b"")` forwards the next request that carries `marker` and closes its connection when
    the answer comes, unsent, `instead` sent in its place (the answer lost on the way, or a proxy's 502 for it: the
    target did the work)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_test_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._live: set[socket.socket] = set()
        self._held: set[socket.socket] = set()
        self._dropping: list[socket.socket] = []
        self._lock = threading.Lock()
        self._holding = False
        self._losing: bytes | None = None  # the marker of a request whose answer is to be lost
        self._instead = b""  # what the client gets in place of a lost answer
        self._doomed: set[socket.socket] = set()  # upstream connections whose next answer is lost
        self.lost = 0  # answers lost so far

    def __enter__(self) -> TcpProxy:
        self.mend()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.cut()

    def drop(self) -> None:
        """A listener that never accepts, with a backlog of none, filled by one connection: the kernel then drops
        each new SYN, and a client's connect waits for its own timeout."""
        self.cut()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(0)
        filler = socket.create_connection(("127.0.0.1", self.port))
        self._dropping = [listener, filler]

    def lose_answer(self, marker: bytes, instead: bytes = b"") -> None:
        with self._lock:
            self._losing, self._instead = marker, instead

    def hold(self) -> None:
        with self._lock:
            self._holding = True

    def mend(self) -> None:
        """Forward again, whatever the outage: the connections held, and what drop() left (it holds the port), are
        closed."""
        with self._lock:
            self._holding = False
            for sock in [*self._held, *self._dropping]:
                _close(sock)
            self._held.clear()
            self._dropping = []
            if self._listener is not None:
                return
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            if self._listener is not None:
                _close(self._listener)  # shutdown() wakes the thread blocked in accept(); close() alone would not
                self._listener = None
            for sock in [*self._live, *self._held, *self._dropping]:
                _close(sock)
            self._live.clear()
            self._held.clear()
            self._dropping = []

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                if self._holding:
                    self._held.add(client)
                    continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._live.update((client, upstream))
            for a, b, answers in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(a, b, answers), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:
                    if answers and source in self._doomed:  # the answer comes: lost, and the connection with it
                        self._doomed.discard(source)
                        self.lost += 1
                        sink.sendall(self._instead)
                        break
                    if not answers and self._losing is not None and self._losing in data:
                        self._losing = None
                        self._doomed.add(sink)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _close(source)
            _close(sink)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
