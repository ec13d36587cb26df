"""In-memory forms of a tenant's delta, as the loaders return them and the slot pool consumes them.

All tensors live on the CPU; the slot pool copies them into preallocated GPU slots.
A delta is immutable and identified by the sha256 of its content (bare hex, no prefix), never by a path:
a 1-bit file's bytes; for a PEFT directory (LoRA, IA3), u64le(len(config)) + adapter_config.json bytes + weights
file bytes.
Only the base fingerprint carries a "sha256:" prefix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from registry.magnitudes import Magnitude


def delta_key(owner: str, kind: str, sha256: str) -> str:
    """A delta's identity in the host tier and the GPU slots: per tenant, so that two tenants who uploaded the
    same content never share a cached copy (one could otherwise time the other's cold loads)."""
    return f"{owner}/{kind}/{sha256}"


@dataclass(frozen=True)
class BaseSpec:
    """What a delta is checked against: the served base's tensors, as in its HF state dict.

    fingerprint:  identifies the base weights (registry.fingerprint).
    tensors:      state-dict name -> (shape, dtype as stored on disk), e.g. "model.norm.weight" -> ((64,), bf16).
    projections:  module paths of the attention and MLP projections, e.g. "model.layers.0.self_attn.q_proj".
    tie_word_embeddings: lm_head shares model.embed_tokens.weight (then "lm_head.weight" is not in `tensors`).
    magnitudes:   state-dict name -> Magnitude (max |x|, Frobenius norm) of the served weights, measured when an
                  engine loads them (registry.magnitudes); deltas absurd against them are refused. Empty: not checked.
    """

    fingerprint: str
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]
    projections: frozenset[str]
    tie_word_embeddings: bool = False
    magnitudes: Mapping[str, Magnitude] = field(default_factory=dict)

    def projection_shape(self, path: str) -> tuple[int, int]:
        """(out, in) of a projection."""
        shape = self.tensors[path + ".weight"][0]
        return shape[0], shape[1]


class _Keyed:
    """A delta's identity in the host tier and the GPU slots, from its owner, kind and content hash."""

    owner: str
    kind: str
    sha256: str

    @property
    def key(self) -> str:
        return delta_key(self.owner, self.kind, self.sha256)


@dataclass(frozen=True)
class LoraDelta(_Keyed):
    """A PEFT LoRA: for each target projection P, W_P' = W_P + scaling * B @ A.

    weights: module path -> (A [r, in], B [out, r]), float32.
    """

    sha256: str
    rank: int
    scaling: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    owner: str = ""  # the tenant that loaded it ("" offline): part of its slot key
    kind: str = field(default="lora", init=False)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


@dataclass(frozen=True)
class BitDelta(_Keyed):
    """A 1-bit delta file (CONTRACT §4): W_P' = W_P + scale[:, None] * (2 * bits - 1).

    projections:  module path -> (sign uint8 [out, ceil(in/8)], scale float32 [out] or [1]).
    replacements: state-dict name -> tensor that replaces the base tensor exactly for this tenant
                  (norm weights, embeddings, lm_head, biases, ...), in the base tensor's shape.
    """

    sha256: str
    base_fingerprint: str
    projections: dict[str, tuple[torch.Tensor, torch.Tensor]]
    replacements: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    owner: str = ""  # the tenant that loaded it ("" offline): part of its slot key
    kind: str = field(default="bitdelta", init=False)

    @property
    def nbytes(self) -> int:
        tensors = [t for pair in self.projections.values() for t in pair] + list(self.replacements.values())
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class Ia3Delta(_Keyed):
    """A PEFT (IA)^3 adapter: learned vectors that scale activations. For each target projection P:
      P not feedforward (keys, values, ...):  y = (x @ W_P.T + b_P) * l_P          (l_P [out])
      P feedforward (the MLP's down_proj):    y = (x * l_P) @ W_P.T + b_P          (l_P [in])
    which is W_P' = W_P * l_P[:, None] (and b_P' = b_P * l_P), resp. W_P' = W_P * l_P[None, :]: PEFT's merge.

    vectors:     module path -> l_P, float32.   feedforward: the module paths whose l_P scales the input.
    """

    sha256: str
    vectors: dict[str, torch.Tensor]
    feedforward: frozenset[str]
    owner: str = ""  # the tenant that loaded it ("" offline): part of its slot key
    kind: str = field(default="ia3", init=False)

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.vectors.values())


Delta = LoraDelta | BitDelta | Ia3Delta
DELTA_KINDS = ("bitdelta", "lora", "ia3")
"""The delta kinds, each with its own slot space (registry.slot_pool)."""


@dataclass(frozen=True)
class Composition:
    """Deltas of one tenant served together as their weighted merge (model soups; a subject and a style):
        W = W_base + sum_k weight_k * (W_k - W_base)
    for every tensor, never materialised: each part sits in its own kind's slot as when served alone, and the
    layers add each part's weighted change per row (serving.models.tenant_layers). Parts: (delta, weight)."""

    parts: tuple[tuple[Delta, float], ...]
    kind: str = field(default="composed", init=False)

    @property
    def owner(self) -> str:
        return self.parts[0][0].owner

    @property
    def key(self) -> str:
        """Names the combination (statistics only: it holds no slot of its own)."""
        return "+".join(f"{d.key}*{w!r}" for d, w in self.parts)


Served = Delta | Composition
"""What a request runs on besides the base."""
