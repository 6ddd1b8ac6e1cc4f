"""The daemon's sockets: the ROUTER clients talk to (frames, size limit, CURVE), and the PULL
socket the scoring worker wakes it on. Only the socket thread uses them.

Nothing here knows about jobs: ``receive`` hands back raw frames, ``send`` encodes one message and
says whether the peer could take it, and a vanished peer is reported to ``on_peer_gone``.
"""
from __future__ import annotations

import logging
from typing import Callable

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from cytoedge.runtime.errors import CytoedgeError
from cytoedge.runtime.service import protocol as P
from cytoedge.runtime.service.config import ServiceConfig

log = logging.getLogger(__name__)

DRAIN_MAX = 1000  # messages read per poll before the worker's wake-ups get a turn


class Transport:
    """Bound sockets for one daemon run (``endpoint`` is the real one once bound)."""

    def __init__(self, config: ServiceConfig, ctx: zmq.Context, wake_endpoint: str,
                 on_peer_gone: Callable[[bytes], None]):
        self.config, self.ctx, self.on_peer_gone = config, ctx, on_peer_gone
        self.auth: ThreadAuthenticator | None = None
        self.router = self.wake = None
        try:
            self.router = ctx.socket(zmq.ROUTER)
            P.apply_socket_options(self.router, config.heartbeat_ivl_ms, config.heartbeat_timeout_ms)
            self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished peer raises EHOSTUNREACH, not a silent drop
            self.router.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes)
            if config.curve_enabled:
                self._start_curve()
            try:
                self.router.bind(config.endpoint)
            except zmq.ZMQError as e:
                raise CytoedgeError(f"cannot listen on {config.endpoint}: {e}") from None
            self.endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
            self.wake = ctx.socket(zmq.PULL)
            self.wake.setsockopt(zmq.LINGER, 0)
            self.wake.bind(wake_endpoint)
            self.poller = zmq.Poller()
            self.poller.register(self.router, zmq.POLLIN)
            self.poller.register(self.wake, zmq.POLLIN)
        except BaseException:
            self.close()
            raise

    def _start_curve(self) -> None:
        """CURVE server: the ZAP authenticator (client-key allow-list) must run and the server keys be
        set before bind(), so no connection is ever accepted in plain text or from an unknown key."""
        cfg = self.config
        public, secret = zmq.auth.load_certificate(str(cfg.curve_secret_key))
        if secret is None:
            raise CytoedgeError(f"{cfg.curve_secret_key}: holds no secret key (use the .key_secret file)")
        self.auth = ThreadAuthenticator(self.ctx)
        self.auth.start()
        self.auth.configure_curve(domain="*", location=str(cfg.curve_allowed_keys))
        self.router.setsockopt(zmq.CURVE_SECRETKEY, secret)
        self.router.setsockopt(zmq.CURVE_PUBLICKEY, public)
        self.router.setsockopt(zmq.CURVE_SERVER, 1)

    def poll(self, timeout_ms: int) -> tuple[list[list[bytes]], set[str], bool]:
        """Wait up to ``timeout_ms``; (client messages with the peer id in front, job ids the worker
        woke us for, whether anything happened at all)."""
        events = dict(self.poller.poll(timeout_ms))
        messages: list[list[bytes]] = []
        woken: set[str] = set()
        if self.router in events:
            for _ in range(DRAIN_MAX):
                try:
                    messages.append(self.router.recv_multipart(zmq.NOBLOCK, copy=True))
                except zmq.Again:
                    break
        if self.wake in events:
            while True:
                try:
                    woken.add(self.wake.recv(zmq.NOBLOCK).decode("ascii", "replace"))
                except zmq.Again:
                    break
        return messages, woken, bool(events)

    def send(self, peer: bytes, command: str, header: dict, payload: tuple[bytes, ...] = ()) -> bool:
        """Send to ``peer``; False when it is gone (EHOSTUNREACH) or not reading (HWM reached)."""
        try:
            self.router.send_multipart([peer, *P.encode(command, header, payload)], zmq.NOBLOCK)
        except zmq.Again:
            return False
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            self.on_peer_gone(peer)
            return False
        return True

    def close(self) -> None:
        for sock in (self.router, self.wake):
            if sock is not None:
                sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
