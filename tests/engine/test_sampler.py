"""Sampler: greedy, temperature, top-k / top-p masks, per-request seeds, distribution, logprobs."""

from __future__ import annotations

import torch

from serving.engine.sampler import RowSampling, Sampler, SamplerOutput, make_generator, mask_top_k_top_p
from serving.engine.sampling_params import SamplingParams

V = 64


def _rows(n: int, **kwargs) -> list[RowSampling]:
    return [RowSampling(SamplingParams(**kwargs)) for _ in range(n)]


def _logits(b: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, V, generator=g) * 3


def test_greedy_is_argmax() -> None:
    logits = _logits(8)
    out = Sampler(seed=0)(logits, _rows(8, temperature=0.0))
    assert isinstance(out, SamplerOutput)
    assert out.token_ids.dtype == torch.int64 and out.token_ids.shape == (8,)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.top_logprobs is None and out.top_ids is None


def test_logits_not_modified() -> None:
    logits = _logits(4)
    before = logits.clone()
    Sampler(seed=0)(logits, _rows(4, temperature=0.7, top_k=5, top_p=0.8))
    assert torch.equal(logits, before)


def test_small_temperature_equals_greedy() -> None:
    logits = _logits(16)
    out = Sampler(seed=1)(logits, _rows(16, temperature=1e-3))
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_top_k_1_equals_greedy() -> None:
    logits = _logits(16)
    sampler = Sampler(seed=2)
    for _ in range(5):
        out = sampler(logits, _rows(16, temperature=1.5, top_k=1))
        assert torch.equal(out.token_ids, logits.argmax(-1))


def test_mixed_greedy_and_sampled_rows() -> None:
    logits = _logits(6)
    rows = [RowSampling(SamplingParams(temperature=0.0 if i % 2 else 1.0, top_k=3)) for i in range(6)]
    out = Sampler(seed=3)(logits, rows)
    greedy = logits.argmax(-1)
    assert torch.equal(out.token_ids[1::2], greedy[1::2])
    top3 = logits.topk(3, dim=-1).indices
    for i in range(0, 6, 2):
        assert out.token_ids[i] in top3[i]


def test_top_p_mask_hand_made() -> None:
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.05, 0.5, 0.15, 0.3], [0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    top_p = torch.tensor([0.7, 0.85, 0.1])
    masked = mask_top_k_top_p(logits, None, top_p)
    # descending order 0.5 | 0.3 | 0.15 | 0.05; the mass before each is 0, 0.5, 0.8, 0.95
    keep = torch.isfinite(masked)
    assert keep.tolist() == [
        [False, True, False, True],  # 0.7: {0.5, 0.3}
        [False, True, True, True],  # 0.85: {0.5, 0.3, 0.15}
        [False, True, False, False],  # 0.1: the top token only
    ]
    assert torch.equal(masked[keep], logits[keep])


def test_top_p_exact_sets() -> None:
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    for p, expected in [(0.4, {1}), (0.6, {1, 3}), (0.85, {1, 3, 2}), (0.96, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})]:
        masked = mask_top_k_top_p(logits, None, torch.tensor([p]))
        assert set(torch.isfinite(masked[0]).nonzero().flatten().tolist()) == expected, p


def test_top_p_mass_exactly_at_the_boundary() -> None:
    # Four equal logits: probabilities exactly 0.25, exclusive masses exactly 0, 0.25, 0.5, 0.75. The smallest
    # nucleus of mass >= top_p stops where the mass reaches top_p: the entry after it is out.
    logits = torch.zeros(3, 4)
    masked = mask_top_k_top_p(logits, None, torch.tensor([0.25, 0.5, 0.75]))
    assert torch.isfinite(masked).sum(dim=-1).tolist() == [1, 2, 3]


def test_top_k_then_top_p_mask() -> None:
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.4, 0.3, 0.2, 0.1]])
    logits = probs.log()
    masked = mask_top_k_top_p(logits, torch.tensor([2, 4]), torch.tensor([1.0, 0.5]))
    assert torch.isfinite(masked).tolist() == [[False, True, False, True], [True, True, False, False]]


def test_top_p_sampling_stays_in_nucleus() -> None:
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(2000, 4).contiguous()
    out = Sampler(seed=4)(logits, _rows(2000, top_p=0.7))
    freq = torch.bincount(out.token_ids, minlength=4).float() / 2000
    assert freq[0] == 0 and freq[2] == 0
    assert abs(freq[1].item() - 0.5 / 0.8) < 0.05 and abs(freq[3].item() - 0.3 / 0.8) < 0.05


def test_distribution_matches_probabilities() -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 4000
    logits = probs.log().expand(n, 4).contiguous()
    out = Sampler(seed=5)(logits, _rows(n))
    freq = torch.bincount(out.token_ids, minlength=4).float() / n
    assert torch.allclose(freq, probs, atol=0.03), freq
    # temperature 0.5 squares the probabilities (then renormalises)
    out = Sampler(seed=6)(logits, _rows(n, temperature=0.5))
    freq = torch.bincount(out.token_ids, minlength=4).float() / n
    sq = probs**2 / (probs**2).sum()
    assert torch.allclose(freq, sq, atol=0.03), freq


def test_seeded_row_distribution_over_steps() -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.log()[None, :]
    row = RowSampling(SamplingParams(seed=123), make_generator(123, "cpu"))
    sampler = Sampler(seed=0)
    tokens = torch.stack([sampler(logits, [row]).token_ids[0] for _ in range(1500)])
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert torch.allclose(freq, probs, atol=0.045), freq


def _seeded_tokens_alone(logit_steps: list[torch.Tensor], params: SamplingParams) -> list[int]:
    row = RowSampling(params, make_generator(params.seed, "cpu"))
    sampler = Sampler(seed=11)
    return [sampler(step[None, :], [row]).token_ids[0].item() for step in logit_steps]


def test_seeded_row_independent_of_batch() -> None:
    steps = 20
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=4242)
    own = [torch.randn(V, generator=torch.Generator().manual_seed(100 + s)) for s in range(steps)]
    alone = _seeded_tokens_alone(own, params)

    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, seed=7),
        SamplingParams(temperature=0.5, top_k=3),
        SamplingParams(temperature=1.3, top_p=0.5),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, seed=8, top_k=10),
        SamplingParams(temperature=1.0, logprobs=3),
        SamplingParams(temperature=2.0, top_p=0.9, top_k=20),
    ]
    position = 5
    rows = [RowSampling(p, make_generator(p.seed, "cpu") if p.seed is not None else None) for p in others]
    target = RowSampling(params, make_generator(params.seed, "cpu"))
    rows.insert(position, target)
    sampler = Sampler(seed=99)
    batched = []
    for s in range(steps):
        logits = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(1000 + s)) * 2
        logits[position] = own[s]
        batched.append(sampler(logits, rows).token_ids[position].item())
    assert batched == alone
    assert len(set(alone)) > 3  # it is really sampling


def test_different_seeds_differ() -> None:
    own = [torch.zeros(V) for _ in range(20)]  # uniform: the seed decides everything
    a = _seeded_tokens_alone(own, SamplingParams(seed=1))
    b = _seeded_tokens_alone(own, SamplingParams(seed=2))
    c = _seeded_tokens_alone(own, SamplingParams(seed=1))
    assert a != b
    assert a == c


def test_logprobs_are_raw_log_softmax() -> None:
    logits = _logits(5)
    rows = [
        RowSampling(SamplingParams(temperature=0.0, logprobs=2)),
        RowSampling(SamplingParams(temperature=0.5, top_k=3, logprobs=5)),
        RowSampling(SamplingParams(temperature=1.0)),
        RowSampling(SamplingParams(temperature=1.0, top_p=0.3, seed=3, logprobs=0), make_generator(3, "cpu")),
        RowSampling(SamplingParams(temperature=0.0)),
    ]
    out = Sampler(seed=7)(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprobs is not None and out.top_logprobs is not None and out.top_ids is not None
    assert out.logprobs.shape == (5,)
    assert torch.allclose(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    assert out.top_logprobs.shape == (5, 5) and out.top_ids.shape == (5, 5)
    assert out.top_ids.dtype == torch.int64
    assert torch.allclose(out.top_logprobs, raw.gather(1, out.top_ids))
    assert torch.all(out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:])  # sorted, best first
    assert torch.equal(out.top_ids[:, 0], logits.argmax(-1))


def test_logprobs_zero_alternatives() -> None:
    logits = _logits(2)
    out = Sampler(seed=0)(logits, _rows(2, temperature=0.0, logprobs=0))
    assert out.top_logprobs is not None and out.top_logprobs.shape == (2, 0)
    assert out.logprobs is not None and torch.all(out.logprobs <= 0)


def test_low_precision_logits_are_upcast() -> None:
    logits = _logits(3).to(torch.bfloat16)
    out = Sampler(seed=0)(logits, _rows(3, temperature=0.0, logprobs=1))
    assert torch.equal(out.token_ids, logits.float().argmax(-1))
    assert out.logprobs is not None and out.logprobs.dtype == torch.float32


def test_unseeded_rows_draw_on_from_one_generator_per_sampler() -> None:
    # The sampler's generator is made once and advances: two steps of the same logits draw anew, while two
    # samplers of one seed draw the same.
    logits = torch.zeros(64, V)  # uniform: every draw is the generator's
    a, b = Sampler(seed=0), Sampler(seed=0)
    first, second = a(logits, _rows(64)).token_ids, a(logits, _rows(64)).token_ids
    assert not torch.equal(first, second)
    assert torch.equal(first, b(logits, _rows(64)).token_ids)


def test_top_p_one_filters_nothing_even_where_float_mass_reaches_one() -> None:
    # p(second) = e^-20 ~ 2e-9: in float32 the mass before it rounds to exactly 1.0. top_p = 1 still keeps it
    # (1 means off), and so does top_k = V.
    logits = torch.tensor([[0.0, -20.0, -21.0]])
    masked = mask_top_k_top_p(logits, torch.tensor([3]), torch.tensor([1.0]))
    assert torch.isfinite(masked).all()


def test_top_k_breaks_ties_by_index() -> None:
    # 50,000 equal logits (an unstable sort reorders ties at this size): top-k keeps the first k, as documented.
    logits = torch.zeros(2, 50_000)
    masked = mask_top_k_top_p(logits, torch.tensor([5, 3]), None)
    assert torch.isfinite(masked[0]).nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    assert torch.isfinite(masked[1]).nonzero().flatten().tolist() == [0, 1, 2]
