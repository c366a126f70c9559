"""The shared-memory collectives (``cptoolkit.layers.shared_memory``) give gloo's results: all-gathers exactly, sums
with the same bits at two ranks and float64 agreement and identical bits on every rank at three and four; tensors
larger than a slot (many pieces), back-to-back collectives with random delays (the two slot parities reused), every
dtype the engine exchanges; a missing peer raises within the timeout and an exited one at once; the engine uses
them where each rank has a core of its own, and generates the same logits either way (TP=2, PCP=2 x DCP=2)."""
import mmap
import os
import subprocess
import sys
import time

import pytest
import torch

from cptoolkit.config import config_from_dict
from cptoolkit.inference.builder import build_engine
from cptoolkit.inference.model_runner import ModelRunner
from cptoolkit.inference.sampling import SamplingParams
from cptoolkit.layers import comm
from cptoolkit.layers.shared_memory import SharedMemoryGroup, shared_memory_groups
from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel
from tests.multiproc import run_ranks

SHAPES = [(1,), (7,), (1, 8, 896), (3, 5, 11), (0,), (1000,), (2, 513)]


def _sums(rank: int, world_size: int, slot_bytes: int):
    """This rank's shared-memory sums (all-reduce, reduce-scatter) and gloo's, over random tensors of several shapes
    and dtypes, with random delays between collectives so that ranks arrive in every order; each all-gather and
    all-to-all checked against gloo's here."""
    import torch.distributed as dist

    channel = SharedMemoryGroup.open(dist.group.WORLD, timeout_s=30, slot_bytes=slot_bytes)
    assert channel is not None
    delays = torch.Generator().manual_seed(100 + rank)
    got, want = [], []
    for round_index in range(3):
        for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.int64):
            for shape in SHAPES:
                values = torch.Generator().manual_seed(1000 * round_index + 10 * rank + len(shape))
                tensor = (torch.randn(shape, generator=values) * 100).to(dtype)
                reference = tensor.clone()
                dist.all_reduce(reference)
                if torch.rand((), generator=delays) < 0.3:
                    time.sleep(float(torch.rand((), generator=delays)) * 2e-3)
                gathered = [torch.empty_like(tensor) for _ in range(world_size)]
                dist.all_gather(gathered, tensor)
                assert torch.equal(channel.all_gather(tensor), torch.stack(gathered))
                stacked = (torch.randn((world_size, *shape), generator=values) * 100).to(dtype)
                exchanged = torch.empty_like(stacked)
                dist.all_to_all_single(exchanged, stacked)
                assert torch.equal(channel.all_to_all(stacked), exchanged)
                scattered = torch.empty(shape, dtype=dtype)
                dist.reduce_scatter_single(scattered.view(-1), stacked.view(-1))  # gloo: flat buffers
                got.append(("reduce_scatter", channel.reduce_scatter(stacked)))
                want.append(scattered)
                assert channel.all_reduce_(tensor) is tensor
                got.append(("all_reduce", tensor))
                want.append(reference)
    return got, want, channel.collectives


@pytest.mark.parametrize("world_size,slot_bytes", [(2, 1 << 20), (2, 256), (3, 1 << 20), (4, 128)])
def test_results_equal_gloos(world_size, slot_bytes):
    results = run_ranks(world_size, _sums, slot_bytes)
    first_got = results[0][0]
    for rank, (got, want, collectives) in enumerate(results):
        assert collectives >= 4 * (len(got) // 2 - 3 * 4)  # one per piece; an empty tensor is none
        for index, ((kind, g), w) in enumerate(zip(got, want)):
            if kind == "all_reduce":
                assert torch.equal(g, first_got[index][1]), f"rank {rank}, tensor {index}: ranks disagree"
            if world_size == 2 or g.dtype in (torch.int64,):
                assert torch.equal(g, w), f"rank {rank}, {kind} {index} ({g.dtype}, {tuple(g.shape)}): " \
                                          f"max diff {(g.double() - w.double()).abs().max().item() if g.numel() else 0}"
            else:  # gloo sums in ring order, the segment in member order: the same sum, rounded differently
                # (bfloat16: partial sums of |x| < 400 rounded to 8 bits, a few units apart)
                bf16 = g.dtype == torch.bfloat16
                torch.testing.assert_close(g.double(), w.double(), rtol=1e-2 if bf16 else 1e-6,
                                           atol=4.0 if bf16 else 1e-3, msg=f"rank {rank}, {kind} {index} ({g.dtype})")


def _many_back_to_back(rank: int, world_size: int):
    """500 small collectives with nothing between them: a member reusing a slot before a slow peer has read it
    would change that peer's sum."""
    import torch.distributed as dist

    channel = SharedMemoryGroup.open(dist.group.WORLD, timeout_s=30, slot_bytes=64)
    sums = [channel.all_reduce_(torch.full((16,), float(rank * 1000 + step))) for step in range(500)]
    return [s.unique().tolist() for s in sums]


def test_back_to_back_collectives_never_overwrite_a_slot_still_read():
    results = run_ranks(3, _many_back_to_back)
    for rank, sums in enumerate(results):
        assert sums == [[float(3 * step + 1000 * (0 + 1 + 2))] for step in range(500)], f"rank {rank}"


def _lone_channel(peer_pid: int, timeout_s: float) -> SharedMemoryGroup:
    """Member 0 of a two-member channel whose member 1 (``peer_pid``) never arrives."""
    segment = mmap.mmap(-1, 2 * 64 + 2 * 2 * 64)
    return SharedMemoryGroup(segment, 0, [os.getpid(), peer_pid], slot_bytes=64, timeout_s=timeout_s,
                                 label="test")


def test_a_peer_that_never_arrives_raises_within_the_timeout():
    channel = _lone_channel(os.getpid(), timeout_s=0.6)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"collective all_reduce over shared memory \(test\) timed out "
                                           r"\(runtime.collective_timeout_s; .*\): waited 0.6 s for member 1"):
        channel.all_reduce_(torch.ones(4))
    assert time.monotonic() - start < 0.6 + 2.0


def test_a_peer_that_has_exited_raises_at_once():
    peer = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    channel = _lone_channel(int(peer.stdout), timeout_s=60)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"all_reduce over shared memory \(test\) failed: member 1 "
                                           rf"\(pid {int(peer.stdout)}\) has exited"):
        channel.all_reduce_(torch.ones(4))
    assert time.monotonic() - start < 2.0


def _routed(rank: int, world_size: int):
    import torch.distributed as dist

    channel, = shared_memory_groups([dist.group.WORLD], timeout_s=30)
    return channel is not None, len(os.sched_getaffinity(0))


@pytest.mark.parametrize("world_size", [2, 4])
def test_used_only_where_each_rank_has_a_core(world_size):
    results = run_ranks(world_size, _routed)
    cores = results[0][1]
    assert [routed for routed, _ in results] == [world_size <= cores] * world_size


MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 8, "num_kv_heads": 2, "ffn_hidden_size": 96,
         "vocab_size": 320, "max_seq_len": 96, "seed": 7}


def _engine_logits(rank: int, world_size: int, layout: dict, shared_memory: bool):
    """Every prefill and decode step's logits, the greedy tokens, and the collectives each group ran through shared
    memory (None: the group has no segment)."""
    cfg = config_from_dict({"parallel": layout, "model": MODEL,
                            "runtime": {"device": "cpu", "tune_matmuls": False,
                                        "shared_memory_collectives": shared_memory},
                            "inference": {"prompts": ["x"], "batch_size": 2, "kv_block_size": 4}}, source="<test>")
    groups = initialize_model_parallel(tp=layout["tp"], pcp=layout["pcp"], dcp=layout["dcp"], num_heads=8,
                                       num_kv_heads=2)
    try:
        engine = build_engine(cfg, groups, torch.device("cpu"))
        channels = {name: comm._SHARED_MEMORY.get(getattr(groups, f"{name}_group")) for name in ("tp", "pcp", "dcp")}
        steps, decode, prefill = [], ModelRunner.decode, ModelRunner.prefill

        def recording_decode(self, *args):
            steps.append(decode(self, *args).clone())
            return steps[-1]

        def recording_prefill(self, *args):
            logits, lengths = prefill(self, *args)
            steps.append(logits.clone())
            return logits, lengths

        ModelRunner.decode, ModelRunner.prefill = recording_decode, recording_prefill
        results = engine.generate(["a b a b", "xyz"], SamplingParams(temperature=0.0, max_new_tokens=5))
        used = {name: None if channel is None else channel.collectives for name, channel in channels.items()}
        return steps, [r.token_ids for r in results], used
    finally:
        destroy_model_parallel()


@pytest.mark.parametrize("layout,groups_used", [
    ({"tp": 2, "pcp": 1, "dcp": 1}, {"tp"}), ({"tp": 1, "pcp": 2, "dcp": 2}, {"pcp", "dcp"}),
    ({"tp": 2, "pcp": 1, "dcp": 2, "decode_comm": "a2a"}, {"tp", "dcp"}),
    ({"tp": 2, "pcp": 1, "dcp": 2, "decode_comm": "ag_rs"}, {"tp", "dcp"})])
def test_the_engine_on_two_ranks_uses_shared_memory_with_gloos_logits(layout, groups_used):
    """TP=2: the replayed layers' all-reduces and the logits' all-gather; PCP=2 x DCP=2: the DCP decode all-gathers
    (one a layer and step) and the PCP group's; TP=2 x DCP=2: the DCP decode's all-gather of q|k|v and its combine,
    an all-to-all (``a2a``) or an all-gather and a reduce-scatter (``ag_rs``)."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one core: the engine keeps gloo (a polling rank would take its peer's core)")
    shared = run_ranks(2, _engine_logits, layout, True)
    gloo = run_ranks(2, _engine_logits, layout, False)
    for rank, ((steps, tokens, used), (want_steps, want_tokens, unused)) in enumerate(zip(shared, gloo)):
        assert set(unused.values()) == {None}, unused
        assert {name for name, count in used.items() if count} == groups_used, used
        assert tokens == want_tokens
        assert len(steps) == len(want_steps) >= 5
        for step, (got, want) in enumerate(zip(steps, want_steps)):
            assert torch.equal(got, want), f"rank {rank}, step {step}: {(got - want).abs().max().item():.3e}"
