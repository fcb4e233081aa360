"""The API as Ray Serve's ingress deployment. Replicas are stateless (the database holds all
state), so `num_replicas` or autoscaling can add as many as the load needs."""

from __future__ import annotations

import logging
import os

from ray import serve

from api.app import context_from_settings, create_app
from api.settings import Settings
from api.wake import WakeCoalescer

log = logging.getLogger("ray.serve")


@serve.deployment(name="api", max_ongoing_requests=200, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class ApiIngress:
    def __init__(self, settings: dict, dispatcher=None):
        # The replica's uvicorn starts after this (Serve's direct ingress, once the replica is
        # initialized) and reads FORWARDED_ALLOW_IPS then: empty, it never rewrites the peer
        # from a client's X-Forwarded-For (by default it trusts the header from loopback,
        # where Serve's HAProxy is). The app reads the header itself, as far as the
        # `trusted_proxy_hops` setting allows (api/routes/deps.py client_ip).
        os.environ["FORWARDED_ALLOW_IPS"] = ""
        self.ctx = context_from_settings(Settings(**settings))
        self.dispatcher = dispatcher
        self._wake = WakeCoalescer(self._send_wake)

    def _wake_dispatcher(self) -> None:
        """Called on the event loop after a request is committed: wakes the dispatcher, at
        most once per api/wake.py's interval."""
        if self.dispatcher is not None:
            self._wake()

    def _send_wake(self) -> None:
        """Fire and forget: the dispatcher also polls, so a lost wake-up only costs latency,
        and the client has its 202 either way."""
        try:
            self.dispatcher.wake.remote()
        except Exception:
            log.warning("could not wake the dispatcher", exc_info=True)

    def _follow(self, generation_id: str):
        """The dispatcher's stream of a generation's text (an async iterator of deltas)."""
        return self.dispatcher.options(stream=True).follow.remote(generation_id)

    def __serve_build_asgi_app__(self):
        return create_app(self.ctx, on_submit=self._wake_dispatcher,
                          follow=self._follow if self.dispatcher is not None else None)
