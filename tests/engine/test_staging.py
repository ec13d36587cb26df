"""One host->device transfer per step: the staged buffer's layout, its growth, and a whole engine run through it
(the GPU's code path, forced on the CPU with separate host and device buffers)."""

from __future__ import annotations

import pytest
import torch

from registry.loading import load_delta
from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine
from serving.engine.sampling_params import SamplingParams
from serving.engine.staging import StepStaging
from tests.helpers import make_bitdelta, make_lora, make_model_dir


def test_views_land_at_their_offsets_after_one_upload() -> None:
    st = StepStaging("cpu", capacity=256, separate_buffers=True).begin()
    a = st([1, 2, 3], torch.int64)
    b = st(torch.tensor([[True, False], [False, True]]), torch.bool)
    c = st([7, 8], torch.int32)
    assert st.copies == 0 and not torch.equal(a, torch.tensor([1, 2, 3]))  # nothing has arrived yet
    st.upload()
    assert st.copies == 1
    assert a.tolist() == [1, 2, 3] and b.tolist() == [True, False, False, True] and c.tolist() == [7, 8]
    for t in (a, b, c):  # every view starts on a 16-byte boundary of the device buffer
        assert (t.data_ptr() - st.dev.data_ptr()) % 16 == 0


def test_a_step_larger_than_the_buffer_still_arrives_and_the_buffer_grows() -> None:
    st = StepStaging("cpu", capacity=32, separate_buffers=True).begin()
    small = st([1, 2], torch.int64)
    big = st(list(range(100)), torch.int64)  # does not fit: copied on its own
    st.upload()
    assert small.tolist() == [1, 2] and big.tolist() == list(range(100))
    assert st.copies == 2
    st.begin()
    assert st.capacity >= 100 * 8
    sizes = (st.capacity // 8 + 1, st.capacity // 4)  # two more that do not fit, one copy each
    bigger = [st(list(range(n)), torch.int64) for n in sizes]
    small = st([3, 4], torch.int64)
    st.upload()  # the buffer's copy and the two of their own
    assert [t.tolist() for t in bigger] == [list(range(n)) for n in sizes] and small.tolist() == [3, 4]
    assert st.copies == 3
    st.begin()
    assert st.capacity >= sizes[1] * 8
    again = st(list(range(100)), torch.int64)
    st.upload()
    assert again.tolist() == list(range(100)) and st.copies == 1


def test_a_step_that_staged_nothing_makes_no_transfer() -> None:
    st = StepStaging("cpu", capacity=64, separate_buffers=True).begin()
    st.upload()
    assert st.copies == 0
    st([1], torch.int64)
    st.upload()
    assert st.copies == 1
    st.begin().upload()  # the next step starts afresh
    assert st.copies == 0


def test_on_the_cpu_nothing_is_copied() -> None:
    st = StepStaging("cpu").begin()
    host = torch.tensor([4, 5])
    assert st(host, torch.int64).data_ptr() == host.data_ptr()
    st.upload()
    assert st.copies == 0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("staging") / "m", arch="mistral", sliding_window=5)


@pytest.fixture(scope="module")
def delta_files(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("staging-deltas")
    lora = make_lora(model_dir, root / "lora", r=2, seed=4)[0]
    bd = make_bitdelta(model_dir, root / "bd.safetensors", seed=5, per_row=True, replace=False)[0]
    return lora, bd


def test_an_engine_through_separate_buffers_gives_the_same_tokens(model_dir, delta_files, monkeypatch) -> None:
    def run(separate: bool, capacity: int) -> tuple[list[list[int]], list[int], list[tuple]]:
        cfg = EngineConfig(device="cpu", dtype="float32", kernel_backend="torch", max_model_len=64,
                           max_num_batched_tokens=64)  # fmt: skip
        engine = LLMEngine.from_model_dir(model_dir, cfg)
        engine.runner.staging = StepStaging("cpu", capacity=capacity, separate_buffers=separate)
        copies: list[int] = []
        moves: list[tuple] = []
        real_to = torch.Tensor.to

        def counting_to(self, *args, **kwargs):  # any other per-array transfer inside the step shows up here
            if any(isinstance(a, (torch.device, str)) for a in args) or "device" in kwargs:
                moves.append(args)
            return real_to(self, *args, **kwargs)

        real_run = engine.runner.run

        def run_step(scheduled):
            with monkeypatch.context() as m:
                m.setattr(torch.Tensor, "to", counting_to)
                result = real_run(scheduled)
            copies.append(engine.runner.staging.copies)
            return result

        engine.runner.run = run_step
        greedy = SamplingParams(max_tokens=9, temperature=0.0)
        prompts = ["The quick brown fox", "To be", "A journey of a thousand miles begins"]
        # base rows and both kinds of delta in one batch: the delta tiles are staged as well
        deltas = [None] + [load_delta(f, engine.spec, engine.slots.max_lora_rank) for f in delta_files]
        out = [c.token_ids for c in engine.generate(list(zip(prompts, [greedy] * 3, deltas)))]
        return out, copies, moves

    plain, _, moves = run(False, 1 << 16)
    assert not moves, f"arrays moved outside the staged transfer: {moves[:3]}"
    staged, copies, moves = run(True, 1 << 16)
    assert not moves, f"arrays moved outside the staged transfer: {moves[:3]}"
    assert staged == plain
    assert copies and all(c == 1 for c in copies)  # one transfer per step (window of 5: several groups, prefill)
    tiny, copies, _ = run(True, 64)  # the first step overflows (copies of its own), then one transfer per step
    assert tiny == plain and copies[0] > 1 and all(c == 1 for c in copies[1:])


@pytest.mark.parametrize("separate_buffers", [True, False])
def test_a_tensor_of_another_dtype_is_staged_in_the_dtype_asked_for(separate_buffers) -> None:
    st = StepStaging("cpu", capacity=256, separate_buffers=separate_buffers).begin()
    out = st(torch.tensor([1, 2, 3], dtype=torch.int64), torch.int32)
    st.upload()
    assert out.dtype == torch.int32 and out.tolist() == [1, 2, 3]
    scales = st(torch.tensor([0.5, 1.5], dtype=torch.float64), torch.float32)
    st.upload()
    assert scales.dtype == torch.float32 and scales.tolist() == [0.5, 1.5]
