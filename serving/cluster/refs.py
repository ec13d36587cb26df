"""What the ingress sends a replica to run a request on: references to stored deltas, never their tensors.

The ingress resolves a request's model in the catalog (its tenant's, newest ready version) and sends these; the
replica loads the blob they name itself (serving.cluster.replica). Plain values: no torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from registry.deltas import delta_key


@dataclass(frozen=True)
class DeltaRef:
    """One stored version's delta, as serving.generation.StoredDelta: whose, which kind, its content, its blob."""

    tenant: str
    kind: str
    sha256: str
    blob: str  # relative to the blobs folder (registry.blob_store.blob_path checks it)

    @property
    def key(self) -> str:
        return delta_key(self.tenant, self.kind, self.sha256)


@dataclass(frozen=True)
class CompositionRef:
    """Several of one tenant's stored deltas with their weights (registry.deltas.Composition, by reference)."""

    parts: tuple[tuple[DeltaRef, float], ...]
    kind: str = field(default="composed", init=False)

    @property
    def key(self) -> str:
        """Routes a composition to a replica holding exactly these parts; its own slots are its parts'."""
        return "+".join(ref.key for ref, _ in self.parts)


def multiplexed_id(served: DeltaRef | CompositionRef | None) -> str:
    """Ray Serve's multiplexed model id of a request: its delta's key ("" for the base: routed by load alone)."""
    return "" if served is None else served.key
