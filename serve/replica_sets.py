"""Which model server replicas the request routers of a gateway process route to, as Serve last told them
(serve/router.py publishes them): a replica that leaves the set is being stopped (scaled down,
redeployed), and the gateway moves the streams it has there (serve/gateway.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable


class ReplicaSets:
    """The model server replicas the request routers of this process route to, by deployment ("app/name"),
    as Serve last told them. Listeners hear, on the router's thread, which replicas left a set."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._replicas: dict[str, frozenset[str]] = {}
        self._listeners: list[Callable[[str, frozenset[str]], None]] = []

    def publish(self, deployment: str, replica_ids: Iterable[str]) -> None:
        current = frozenset(replica_ids)
        with self._lock:
            left = self._replicas.get(deployment, frozenset()) - current
            self._replicas[deployment] = current
            listeners = list(self._listeners)
        if left:
            for listener in listeners:
                listener(deployment, left)

    def subscribe(self, listener: Callable[[str, frozenset[str]], None]) -> None:
        with self._lock:
            self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[str, frozenset[str]], None]) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)


REPLICA_SETS = ReplicaSets()


def deployment_key(app_name: str, deployment_name: str) -> str:
    return f"{app_name}/{deployment_name}"
