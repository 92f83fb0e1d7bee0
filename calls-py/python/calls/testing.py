"""Helpers for scripting a :class:`calls.Router` in tests without sockets.

:class:`Peer` is a str0m client (the core's simulation peer): it publishes synthetic Opus and
VP8, answers the router's offer of its receive slots, follows the slot mapping (``slots()``) and
counts what it receives per slot (``slot_stats()``) and per publisher (``received()``). :class:`Network` connects peers to a
router in virtual time::

    net = Network(calls.Router())
    alice = net.add_peer("standup", "alice")
    bob = net.add_peer("standup", "bob")
    net.run_until(lambda: alice.packets_received > 50 and bob.packets_received > 50)
"""

from typing import Callable, Dict, List, Optional, Tuple

from calls._calls import Event, Peer, Record, Router, Signal, Timeout, Transmit

__all__ = ["Network", "Peer"]

ROUTER_ADDR: Tuple[str, int] = ("127.0.0.1", 8443)


class Network:
    """A router and its peers on a lossless in-memory network with one virtual clock.

    Every datagram is delivered at once; signaling goes through JSON text both ways.
    """

    def __init__(self, router: Router, now: float = 0.0) -> None:
        self.router = router
        self.now = now
        self.peers: Dict[int, Peer] = {}
        self.events: List[Event] = []
        self.signals: List[Signal] = []
        #: Every recording output, in order (:meth:`Router.start_recording`).
        self.records: List[Record] = []
        self._by_addr: Dict[Tuple[str, int], Peer] = {}
        self._next_session = 1
        self._router_timeout: Optional[float] = None

    def add_peer(
        self, call: str, user: str, *, audio: bool = True, video: bool = True
    ) -> Peer:
        """Joins a new participant to ``call`` and starts its offer."""
        session = self._next_session
        self._next_session += 1
        addr = ("127.0.0.1", 40000 + session)
        peer = Peer(session, user, addr, self.now, audio=audio, video=video, seed=session)
        self.router.join(call, session, user, self.now)
        self.peers[session] = peer
        self._by_addr[addr] = peer
        peer.start(self.now)
        self._settle()
        return peer

    def _drain_router(self) -> bool:
        moved = False
        for out in self.router.drain():
            if isinstance(out, Transmit):
                peer = self._by_addr.get(out.destination)
                if peer is not None:
                    peer.handle_datagram(out.source, out.data, self.now)
                    moved = True
            elif isinstance(out, Signal):
                self.signals.append(out)
                peer = self.peers.get(out.session)
                if peer is not None:
                    peer.handle_signal(out.json, self.now)
                    moved = True
            elif isinstance(out, Event):
                self.events.append(out)
            elif isinstance(out, Record):
                self.records.append(out)
            elif isinstance(out, Timeout):
                self._router_timeout = out.at
        return moved

    def _drain_peers(self) -> bool:
        moved = False
        for session, peer in self.peers.items():
            for text in peer.take_signals():
                self.router.handle_signal(session, text, self.now)
                moved = True
            for t in peer.take_transmits():
                self.router.handle_datagram(t.data, t.source, t.destination, self.now)
                moved = True
        return moved

    def _settle(self) -> None:
        for _ in range(1000):
            if not (self._drain_peers() | self._drain_router()):
                return

    def step(self, max_step: float = 0.005) -> None:
        """Advances the clock to the next timer (at most ``max_step``) and runs everything due."""
        deadlines = [p.poll_timeout() for p in self.peers.values()]
        deadlines.append(self._router_timeout)
        due = [d for d in deadlines if d is not None]
        target = min(due) if due else self.now + max_step
        self.now = min(max(target, self.now + 0.0001), self.now + max_step)
        self.router.handle_timeout(self.now)
        for peer in self.peers.values():
            timeout = peer.poll_timeout()
            if timeout is not None and timeout <= self.now:
                peer.handle_timeout(self.now)
        self._settle()

    def run_until(self, done: Callable[[], bool], limit: float = 10.0) -> bool:
        """Steps until ``done()`` or ``limit`` virtual seconds; returns ``done()``."""
        end = self.now + limit
        while not done() and self.now < end:
            self.step()
        return done()

    def run_for(self, seconds: float) -> None:
        """Steps for ``seconds`` of virtual time."""
        end = self.now + seconds
        while self.now < end:
            self.step()
