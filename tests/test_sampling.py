"""Sampling: greedy is argmax, filters reduce to greedy at their limits, draws are reproducible and
follow the filtered softmax, draws run on the generator's device, and every rank ends up with the same
tokens."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from cptoolkit.inference.sampling import SamplingParams, broadcast_tokens, make_generator, sample
from tests.multiproc import run_ranks

GREEDY = SamplingParams(temperature=0.0)


def _first_max(logits):
    """Reference greedy choice per row of ``logits [b, vocab]``, in plain Python (not ``torch.argmax``):
    the largest value, ties to the lowest token id."""
    return [row.index(max(row)) for row in logits.tolist()]


def _draw(logits_row, params, num_draws, seed=0):
    """``num_draws`` successive draws of one request (one generator) from a fixed ``logits_row [vocab]``."""
    generator = make_generator(seed, request_index=0)
    return sample(logits_row.expand(num_draws, -1), [params] * num_draws, [generator] * num_draws)


def _frequencies(tokens, vocab):
    return torch.bincount(tokens, minlength=vocab).double() / tokens.numel()


def test_greedy_is_argmax_with_ties_to_the_lowest_id():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    logits[4, [45, 12]] = 100.0
    logits[5, [7, 3, 40]] = 100.0
    generators = [make_generator(0, i) for i in range(6)]
    tokens = sample(logits, [GREEDY] * 6, generators)
    assert tokens.dtype == torch.int64
    assert tokens.tolist() == _first_max(logits) and tokens[4:].tolist() == [12, 3]


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.3, top_k=1),
                                    SamplingParams(temperature=2.0, top_p=1e-6),
                                    SamplingParams(temperature=0.7, top_k=5, top_p=1e-3)])
def test_filters_at_their_limit_are_greedy(params):
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(1))
    logits[7, [9, 2]] = 50.0
    tokens = sample(logits, [params] * 8, [make_generator(3, i) for i in range(8)])
    assert tokens.tolist() == _first_max(logits) and tokens[7].item() == 2


def test_same_seed_same_tokens_different_seeds_differ_on_a_flat_distribution():
    flat = torch.zeros(1000)
    params = SamplingParams(temperature=1.0)
    first, again = _draw(flat, params, 64, seed=11), _draw(flat, params, 64, seed=11)
    other_seed = _draw(flat, params, 64, seed=12)
    assert torch.equal(first, again)
    assert (first != other_seed).sum() > 50, f"only {(first != other_seed).sum()} of 64 draws differ"
    request_a = sample(flat.expand(2, -1), [params] * 2, [make_generator(11, 0), make_generator(11, 1)])
    assert request_a[0] != request_a[1], "requests 0 and 1 with one seed must get different streams"


@pytest.mark.parametrize("params,kept", [
    (SamplingParams(temperature=0.7), [0, 1, 2, 3, 4]),
    (SamplingParams(temperature=1.5, top_k=3), [0, 1, 2]),
    (SamplingParams(temperature=1.0, top_p=0.75), [0, 1]),
])
def test_empirical_frequencies_match_the_filtered_softmax(params, kept):
    logits = torch.log(torch.tensor([0.5, 0.3, 0.12, 0.05, 0.03], dtype=torch.float64))
    num_draws = 12000
    expected = torch.zeros(5, dtype=torch.float64)
    expected[kept] = torch.softmax(logits[kept] / params.temperature, -1)
    observed = _frequencies(_draw(logits.float(), params, num_draws, seed=5), 5)
    diff = (observed - expected).abs()
    # 4 standard deviations of a frequency over 12000 draws is at most 4 * sqrt(0.25 / 12000) = 0.0183
    assert diff.max() < 0.0183, f"observed {observed.tolist()} vs {expected.tolist()}: max abs diff {diff.max()}, " \
                                f"mean {diff.mean()}"
    assert observed[[i for i in range(5) if i not in kept]].sum() == 0


RANK_PARAMS = [SamplingParams(temperature=0.9, top_k=10, top_p=0.9, seed=7)] * 4


def _three_sampling_steps() -> list[list[int]]:
    """Three decode steps of 4 requests on fixed logits: ``[3][4]`` token ids."""
    logits = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    generators = [make_generator(7, i) for i in range(4)]
    return [sample(logits, RANK_PARAMS, generators).tolist() for _ in range(3)]


def _same_tokens_on_every_rank(rank, world_size):
    import torch.distributed as dist
    # Give each rank different global RNG state: tokens may depend only on the per-request generators.
    torch.manual_seed(1000 + rank)
    torch.rand(rank + 1)
    sampled = _three_sampling_steps()
    different = torch.full((4,), rank, dtype=torch.int64)
    received = broadcast_tokens(different, dist.group.WORLD, src=1)
    # plain lists: a tensor sent back through the result queue needs its (exited) rank process alive
    return sampled, received.tolist()


def test_two_ranks_sample_the_same_tokens_and_broadcast_from_src():
    """Ranks with different global RNG states (and this process, a third state) draw the same tokens
    from identically seeded per-request generators; the draws really vary, so equality is not luck."""
    results = run_ranks(2, _same_tokens_on_every_rank, timeout_s=60)
    (sampled_0, received_0), (sampled_1, received_1) = results
    torch.manual_seed(99)
    here = _three_sampling_steps()
    assert sampled_0 == sampled_1 == here, f"rank 0 {sampled_0}, rank 1 {sampled_1}, this process {here}"
    assert len({token for step in here for token in step}) >= 4, f"draws barely vary: {here}"
    assert received_0 == received_1 == [1, 1, 1, 1]


def test_logits_off_the_generators_device_draw_on_the_generators_device(monkeypatch):
    """The engine's generators live on the CPU; on a GPU the logits do not. CUDA's random kernels reject a
    generator on another device, so the noise must be drawn on the generator's device and moved to the logits'.
    Without a GPU, fake "meta" logits stand in for CUDA ones (FakeTensorMode lets tensors move between them),
    and the stand-in ``Tensor.uniform_`` enforces the device rule that the CUDA kernel enforces (the CPU and meta
    kernels do not check it)."""
    real_uniform = torch.Tensor.uniform_
    draw_devices = []

    def device_checked_uniform(tensor, *args, generator):
        if tensor.device != generator.device:
            raise RuntimeError(f"Expected a '{tensor.device.type}' device type for generator but found "
                               f"'{generator.device.type}'")
        draw_devices.append(tensor.device.type)
        return real_uniform(tensor, *args, generator=generator)

    monkeypatch.setattr(torch.Tensor, "uniform_", device_checked_uniform)
    params = [SamplingParams(temperature=0.8, top_k=5), GREEDY, SamplingParams(temperature=1.2)]
    with FakeTensorMode(allow_non_fake_inputs=True):
        logits = torch.empty(3, 50, device="meta")
        tokens = sample(logits, params, [make_generator(0, i) for i in range(3)])
    assert tokens.device.type == "meta" and tuple(tokens.shape) == (3,) and tokens.dtype == torch.int64
    assert draw_devices == ["cpu", "cpu"], draw_devices


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_logits_with_cpu_generators_draw_the_cpu_tokens():
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=0.9, top_k=20, top_p=0.95)] * 4
    on_cpu = sample(logits, params, [make_generator(5, i) for i in range(4)])
    on_cuda = sample(logits.cuda(), params, [make_generator(5, i) for i in range(4)])
    assert on_cuda.device.type == "cuda" and on_cuda.tolist() == on_cpu.tolist()


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-0.1), r"SamplingParams.temperature = -0.1 is invalid: it must be a number >= 0"),
    (dict(top_k=-1), r"SamplingParams.top_k = -1 is invalid: it must be an integer >= 0"),
    (dict(top_k=2.5), r"SamplingParams.top_k = 2.5 is invalid"),
    (dict(top_p=0.0), r"SamplingParams.top_p = 0.0 is invalid: it must be a number in \(0, 1\]"),
    (dict(top_p=1.5), r"SamplingParams.top_p = 1.5 is invalid"),
    (dict(seed=-3), r"SamplingParams.seed = -3 is invalid: it must be an integer >= 0"),
    (dict(max_new_tokens=-1), r"SamplingParams.max_new_tokens = -1 is invalid: it must be an integer >= 0"),
    (dict(stop_token_ids=[2, -1]), r"SamplingParams.stop_token_ids = \[2, -1\] is invalid"),
    (dict(stop_strings="###"), r"SamplingParams.stop_strings = '###' is invalid: it must be a sequence of "
                               r"non-empty strings"),
    (dict(stop_strings=["ok", ""]), r"SamplingParams.stop_strings = \['ok', ''\] is invalid"),
])
def test_validation_names_field_value_and_rule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_lists_are_stored_as_tuples_and_sample_checks_batch_sizes():
    params = SamplingParams(stop_token_ids=[2, 3], stop_strings=["\n\n"])
    assert params.stop_token_ids == (2, 3) and params.stop_strings == ("\n\n",)
    with pytest.raises(ValueError, match=r"logits \[2, 5\], 1 params, 2 generators"):
        sample(torch.zeros(2, 5), [params], [make_generator(0, 0), make_generator(0, 1)])
