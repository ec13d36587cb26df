"""Errors of a cluster that one server does not have (the API maps them: serving.api.errors). No torch, no Ray."""

from __future__ import annotations

from serving.engine.errors import EngineDead


class ReplicaLost(EngineDead):
    """The engine replica running a request stopped (killed, out of memory): 503 replica_lost with Retry-After;
    the other replicas serve new requests."""
