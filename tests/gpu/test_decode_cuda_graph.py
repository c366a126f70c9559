"""The engine's decode step, padded to its batch bucket, captured as a CUDA graph and replayed: the replay gives the
eager step's logits and writes the eager step's K/V.

Three requests of different lengths (bucket 4: one padding row) are prefilled and decoded a few steps on one GPU
(float32, the ``torch`` block backend), then the next decode step (``ModelRunner.decode_step``: its plan made on the
host) runs eagerly, is captured with ``torch.cuda.graph`` and replayed twice, the cache set back to its state before
the step each time: capture fails on any host round-trip or host-to-device copy inside the forward, and a replay
runs the recorded kernels on the step's tensors. Replay and eager agree within ``RTOL`` of the largest logit
(the same kernels; cuBLAS may pick another algorithm under capture).

What this does not show: a graph replayed on later steps. A step's shapes are its bucket's and its read width
(``s_max``, the longest shard of the batch, which grows with the context), and its tensors are new every step; a
graph runner would keep static input buffers (ids, positions, the plan's write and read indices) per (bucket,
read width) and copy each step's values into them.
"""
import copy

import torch

from cptoolkit.config import config_from_dict
from cptoolkit.inference.builder import build_engine
from cptoolkit.inference.sampling import SamplingParams
from cptoolkit.models.gpt import gpt_forward
from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel
from tests.gpu.devices import GPU
from tests.multiproc import run_ranks
from tests.test_engine import BASE, PROMPTS

pytestmark = GPU

RTOL = 1e-5


def _books(cache) -> dict:
    """The cache's host books (stored and written slots per layer of every request), to set back later."""
    return {request_id: (list(state.shard_lens), list(state.written)) for request_id, state in cache._requests.items()}


def _set_back(cache, books: dict, storage: torch.Tensor) -> None:
    """The cache as it was: the books in place (the step's views hold the same state objects) and the storage."""
    for request_id, (shard_lens, written) in books.items():
        state = cache._requests[request_id]
        state.shard_lens[:], state.written[:] = shard_lens, written
    cache.storage.copy_(storage)


def _capture_rank(rank, world_size):
    torch.cuda.set_device(0)
    raw = copy.deepcopy(BASE)
    raw["runtime"] = {"device": "cuda", "dtype": "float32", "attention_backend": "torch"}
    raw["inference"]["batch_size"] = 3
    cfg = config_from_dict(raw, source="<gpu test>")
    groups = initialize_model_parallel(tp=1, pcp=1, dcp=1, num_heads=cfg.model.num_attention_heads,
                                       num_kv_heads=cfg.model.num_kv_heads, backend="nccl")
    try:
        engine = build_engine(cfg, groups, torch.device("cuda"))
        model = engine.model
        # CPGPTModel moves RoPE's tables with its parameters: no host-to-device copy in a forward (which a capture
        # would refuse).
        assert model.rotary_pos_emb.inv_freq.is_cuda
        for index, prompt in enumerate(PROMPTS[:3]):
            engine.add_request(prompt, SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True), index)
        running = engine.scheduler.running
        while len(running) < 3 or not all(len(r.output_ids) >= 3 for r in running):
            engine.step()
        requests = list(engine.scheduler.running)
        step = engine.runner.decode_step(requests, [[] for _ in requests])
        cache, books = engine.cache, _books(engine.cache)
        storage = cache.storage.clone()

        def forward() -> torch.Tensor:
            with torch.no_grad():
                return gpt_forward(model, step.input_ids, step.positions, engine.runtime, phase=step.phase)

        eager = forward().clone()
        eager_storage = cache.storage.clone()
        _set_back(cache, books, storage)
        side = torch.cuda.Stream()  # warm-up off the default stream, as torch.cuda.graph asks
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                forward()
                _set_back(cache, books, storage)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = forward()
        _set_back(cache, books, storage)  # capturing ran the host side of the step (its books), no kernel
        replays = []
        for _ in range(2):
            graph.replay()
            torch.cuda.synchronize()
            replays.append((captured.clone().cpu(), cache.storage.clone().cpu()))
            _set_back(cache, books, storage)
        return (len(requests), tuple(step.input_ids.shape), eager.cpu(), eager_storage.cpu(), replays)
    finally:
        destroy_model_parallel()


def test_the_decode_step_captured_as_a_cuda_graph_replays_the_eager_step():
    num_requests, shape, eager, eager_storage, replays = run_ranks(1, _capture_rank, timeout_s=600)[0]
    assert num_requests == 3 and shape == (4, 1), (num_requests, shape)
    scale = float(eager.abs().max())
    for replay, (logits, storage) in enumerate(replays):
        diff = (logits - eager).abs()
        assert diff.max() <= RTOL * scale, f"replay {replay}: logits differ by max {diff.max():.3e}, mean " \
                                           f"{diff.mean():.3e} (largest logit {scale:.3e})"
        stored = (storage - eager_storage).abs()
        assert stored.max() <= RTOL * float(eager_storage.abs().max()), \
            f"replay {replay}: K/V differ by max {stored.max():.3e}, mean {stored.mean():.3e}"
