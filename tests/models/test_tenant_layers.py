"""TenantLinear over random tenant mixes (hypothesis): every row — the base, one delta of any kind, or a composition
of weighted parts — equals x @ W_row.T + b_row with the row's merged weights written out explicitly:
W_row = W + sum_k w_k (W_k - W), b_row likewise, W_k each part's fine-tuned weight (LoRA W + s B A, 1-bit
W + scale * sign, a replaced W and bias, (IA)^3 W * l on rows or columns). With the torch references and the
CPU kernels."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltakernels import select_delta_ops
from formats.signs import pack_signs, unpack_signs
from registry.deltas import BitDelta, Ia3Delta, LoraDelta
from registry.slot_pool import SlotPool
from serving.models.tenant_layers import DeltaBatch, TenantLinear

OUT, IN, PATH = 6, 16, "m.q"
gen = torch.Generator().manual_seed(0)
W, B = torch.randn(OUT, IN, generator=gen), torch.randn(OUT, generator=gen)


def _lora(name: str, r: int) -> LoraDelta:
    a, b = torch.randn(r, IN, generator=gen), torch.randn(OUT, r, generator=gen)
    return LoraDelta(sha256=name, rank=r, scaling=0.5, weights={PATH: (a, b)}, owner="t")


def _bitdelta(name: str) -> BitDelta:
    sign = pack_signs(torch.randn(OUT, IN, generator=gen) > 0)
    return BitDelta(sha256=name, base_fingerprint="sha256:x", projections={PATH: (sign, torch.rand(OUT, generator=gen))},
                    replacements={}, owner="t")  # fmt: skip


REPLACING = BitDelta(sha256="repl", base_fingerprint="sha256:x", projections={}, owner="t",
                     replacements={f"{PATH}.weight": torch.randn(OUT, IN, generator=gen),
                                   f"{PATH}.bias": torch.randn(OUT, generator=gen)})  # fmt: skip
DELTAS = {
    "lora2": _lora("lora2", 2),
    "lora4": _lora("lora4", 4),
    "bd": _bitdelta("bd"),
    "repl": REPLACING,
    "ia3-out": Ia3Delta(sha256="io", vectors={PATH: 1 + 0.5 * torch.randn(OUT, generator=gen)}, feedforward=frozenset(),
                        owner="t"),  # fmt: skip
    "ia3-in": Ia3Delta(sha256="ii", vectors={PATH: 1 + 0.5 * torch.randn(IN, generator=gen)}, feedforward=frozenset({PATH}),
                       owner="t"),  # fmt: skip
}


def finetuned(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_k, b_k): the fine-tune a delta stands for, written out."""
    d = DELTAS[name]
    if isinstance(d, LoraDelta):
        a, b = d.weights[PATH]
        return W + d.scaling * b @ a, B
    if isinstance(d, Ia3Delta):
        v = d.vectors[PATH]
        return (W * v[None, :], B) if d.feedforward else (W * v[:, None], B * v)
    if d.replacements:
        return d.replacements[f"{PATH}.weight"], d.replacements[f"{PATH}.bias"]
    sign, scale = d.projections[PATH]
    return W + scale[:, None] * unpack_signs(sign, IN), B


def merged(parts: list[tuple[str, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    w, b = W.clone(), B.clone()
    for name, weight in parts:
        wk, bk = finetuned(name)
        w += weight * (wk - W)
        b += weight * (bk - B)
    return w, b


part = st.tuples(st.sampled_from(sorted(DELTAS)), st.floats(-2.0, 2.0, allow_nan=False).filter(lambda w: abs(w) > 0.05))
row = st.one_of(
    st.none(),  # the base
    st.sampled_from(sorted(DELTAS)),  # one delta as it is
    st.lists(part, min_size=1, max_size=3, unique_by=lambda p: p[0]).filter(  # a composition
        lambda ps: not {"ia3-in", "ia3-out"} <= {n for n, _ in ps}),  # refused: one projection scaled both ways
)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@settings(max_examples=60, deadline=None)
@given(rows=st.lists(row, min_size=1, max_size=7))
def test_every_row_is_its_merged_weights(backend, rows) -> None:
    ops = select_delta_ops(backend, torch.device("cpu"))
    pool = SlotPool({PATH: (OUT, IN)}, {f"{PATH}.weight": W, f"{PATH}.bias": B}, bitdelta_slots=2, lora_slots=2,
                    ia3_slots=2, max_lora_rank=4, dtype=torch.float32, device="cpu", sign_layout=ops.sign_layout)  # fmt: skip
    slots = {name: pool.acquire(d) for name, d in DELTAS.items()}
    layer = TenantLinear(IN, OUT, True, PATH)
    layer.weight.data.copy_(W)
    layer.bias.data.copy_(B)
    plain = {"bitdelta": [], "lora": [], "ia3": []}
    composed = []
    for r in rows:
        single = DELTAS[r] if isinstance(r, str) else None
        for kind in plain:
            plain[kind].append(slots[r] if single is not None and single.kind == kind else -1)
        composed.append([(DELTAS[n].kind, slots[n], w) for n, w in r] if isinstance(r, list) else [])
    deltas = DeltaBatch.build(ops, pool, plain["bitdelta"], plain["lora"], [1] * len(rows),
                              torch.zeros(len(rows), 4), torch.device("cpu"), ia3_slots=plain["ia3"],
                              composed=composed if any(composed) else None)  # fmt: skip
    x = torch.randn(len(rows), IN, generator=torch.Generator().manual_seed(len(rows)))
    with torch.no_grad():
        y = layer(x, deltas)
    for i, r in enumerate(rows):
        w, b = merged([] if r is None else [(r, 1.0)] if isinstance(r, str) else r)
        torch.testing.assert_close(y[i], x[i] @ w.T + b, atol=2e-4, rtol=1e-4, msg=lambda m, r=r: f"row {r}: {m}")
