"""Multi-head latent attention (DeepSeek-V2/V3) against transformers' own models.

Three tiny random checkpoints made by ``transformers`` (DeepSeek-V2 without a query bottleneck and with YaRN
whose ``attention_factor`` and ``mscale_all_dim`` both differ from 1; DeepSeek-V3 with one, RoPE interleaved;
DeepSeek-V3 with YaRN and RoPE in halves), every layer dense:

- float32: cptoolkit's engine generates transformers' greedy tokens, every logit it samples from within 2e-6 of
  transformers' largest, at 1 rank and at TP2xPCP2xDCP4 / TP2xPCP2xDCP2 / TP1xPCP4xDCP4 (every prefill comm,
  both decode comms), and with chunked prefill over the sharded latent cache plus prefix caching;
- against transformers' model in float64 (the plain reference): cptoolkit's float32 prefill loss and every
  parameter's gradient through the expanded form over PCP = 1 and 4 (p2p, all_gather, a2a), and the absorbed
  decode's logits at 1, 4 and 8 ranks (DCP up to 8), to float32 rounding (1e-5 of the largest);
- the KV cache holds the latent and RoPE key per token and nothing else: its bytes per block are
  ``layers x block x (kv_lora_rank + qk_rope_head_dim) x itemsize`` on every rank, whatever TP is.
"""
from __future__ import annotations

import copy
from collections import defaultdict

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from cptoolkit.config import config_from_dict
from cptoolkit.inference.builder import build_engine
from cptoolkit.inference.sampling import SamplingParams
from cptoolkit.layers.core_attention import AttentionRuntime
from cptoolkit.layers.dual_chunk_swap import shard_positions, shard_sequence
from cptoolkit.models.checkpoint import load_model_checkpoint
from cptoolkit.models.families.deepseek import DEEPSEEK
from cptoolkit.models.gpt import gpt_forward
from cptoolkit.models.families.registry import read_hf_config
from cptoolkit.models.shape import GPTShape
from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel
from tests.multiproc import run_ranks
from tests.hf_checkpoints import recorded_logits, word_tokenizer

transformers = pytest.importorskip("transformers")

VOCAB, PROMPT_LENS, MAX_NEW, TRAIN_LEN = 64, (21, 29), 8, 24
RTOL_FLOAT32, RTOL_VS_FLOAT64 = 2e-6, 1e-5
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, first_k_dense_replace=2,
             max_position_embeddings=64, initializer_range=0.2, bos_token_id=1, eos_token_id=None, pad_token_id=0)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 1000.0}
CASES = {
    "v2_yarn": ("DeepseekV2", dict(q_lora_rank=None,
                                   rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 0.5})),
    "v3": ("DeepseekV3", dict(q_lora_rank=32, rope_interleave=True)),
    "v3_yarn_halves": ("DeepseekV3", dict(q_lora_rank=32, rope_interleave=False,
                                          rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0})),
}
# (tp, pcp, dcp, prefill_comm, decode_comm, prefill_chunk_size, prefix_caching) per world size.
LAYOUTS = {1: [(1, 1, 1, "p2p", "a2a", None, False)],
           4: [(2, 2, 4, "p2p", "a2a", None, False), (2, 2, 2, "all_gather", "ag_rs", None, False),
               (1, 4, 4, "a2a", "a2a", None, False), (2, 2, 2, "p2p", "a2a", 8, True)]}
FLOAT64_DECODE = {1: (1, 1, 1), 4: (2, 2, 4), 8: (2, 4, 8)}
TRAIN_COMMS = {1: ("p2p",), 4: ("p2p", "all_gather", "a2a")}


def _hf_model(name: str, dtype=torch.float32):
    family, arguments = CASES[name]
    config = getattr(transformers, f"{family}Config")(**SIZES, **arguments)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:  # norms start at 1: moved, so a norm loaded in the wrong place shows
                param.add_(torch.randn_like(param) * 0.2)
    return model.to(dtype)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{case: (directory, prompts, greedy tokens, float32 logits, float64 logits, train ids, labels,
    float64 train loss, float64 grads by HF name)}."""
    cases = {}
    for seed, name in enumerate(CASES):
        torch.manual_seed(seed)
        model = _hf_model(name)
        directory = tmp_path_factory.mktemp(name)
        model.save_pretrained(directory)
        word_tokenizer().save_pretrained(directory)
        prompts = [torch.randint(2, VOCAB, (n,)).tolist() for n in PROMPT_LENS]
        prompts.append(prompts[1][:17] + prompts[0][:6])  # shares 17 tokens (two pages of 8) with prompt 1
        reference = copy.deepcopy(model).double()  # the float64 reference
        tokens, logits32, logits64 = [], [], []
        with torch.no_grad():
            for prompt in prompts:
                out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False)
                tokens.append(out[0, len(prompt):].tolist())
                logits32.append(model(out[:, :-1]).logits[0, len(prompt) - 1:])
                logits64.append(reference(out[:, :-1]).logits[0, len(prompt) - 1:])
        ids, labels = torch.randint(2, VOCAB, (2, TRAIN_LEN)), torch.randint(0, VOCAB, (2, TRAIN_LEN))
        loss = F.cross_entropy(reference(ids).logits.flatten(0, 1), labels.flatten(), reduction="sum")
        loss.backward()
        grads = {n: p.grad.clone() for n, p in reference.named_parameters()}
        cases[name] = (str(directory), prompts, tokens, logits32, logits64, ids, labels, float(loss), grads)
    return cases


def _engine_config(directory, tp, pcp, dcp, prefill_comm, decode_comm, chunk=None, prefix_caching=False,
                   dtype="float32"):
    return config_from_dict({
        "parallel": dict(tp=tp, pcp=pcp, dcp=dcp, prefill_comm=prefill_comm, decode_comm=decode_comm),
        "model": {"checkpoint": directory}, "runtime": {"device": "cpu", "dtype": dtype},
        "inference": {"prompts": ["unused"], "batch_size": 3, "kv_block_size": 4, "prefill_chunk_size": chunk,
                      "prefix_caching": prefix_caching}}, source="<test>")


def _generate(cfg, prompts):
    """(tokens per prompt, sampled-from logits per prompt, the cache's bytes per block, its latent width)."""
    p = cfg.parallel
    groups = initialize_model_parallel(tp=p.tp, pcp=p.pcp, dcp=p.dcp, num_heads=cfg.model.num_attention_heads,
                                       num_kv_heads=cfg.model.num_kv_heads)
    try:
        engine = build_engine(cfg, groups, torch.device("cpu"))
        recorded = recorded_logits(engine)
        # The third prompt after the second has finished, so with prefix caching it reuses two cached pages.
        results = engine.generate(prompts[:2], SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW))
        results += engine.generate(prompts[2:], SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW))
        cached = [r.metrics.cached_prompt_tokens for r in results]
        # Engine.generate numbers its requests from 0 in each call: index 0 is prompt 0, then prompt 2.
        logits = [torch.stack(recorded[0][:MAX_NEW]), torch.stack(recorded[1]), torch.stack(recorded[0][MAX_NEW:])]
        return ([r.token_ids for r in results], logits, engine.cache.bytes_per_block,
                engine.cache.head_dim, engine.cache.storage.shape[1], cached)
    finally:
        destroy_model_parallel()


def _relative(got: list, want: list) -> float:
    return max(float((g.double() - w.double()).abs().max() / w.abs().max()) for g, w in zip(got, want))


def _train_step(directory, pcp: int, comm: str, ids, labels):
    """float32 summed loss and full gradients (TP = 1, summed over PCP) of one DualChunkSwap prefill."""
    groups = initialize_model_parallel(tp=1, pcp=pcp, dcp=pcp, num_heads=SIZES["num_attention_heads"],
                                       num_kv_heads=1)
    try:
        runtime = AttentionRuntime(pcp_group=groups.pcp_group, prefill_comm=comm)
        model = load_model_checkpoint(directory, groups.megatron_pg_collection(), runtime, torch.float32)
        rank = groups.pcp_rank
        positions = shard_positions(TRAIN_LEN, rank, pcp).expand(ids.shape[0], -1)
        losses = gpt_forward(model, shard_sequence(ids, rank, pcp, seq_dim=1), positions, runtime,
                             labels=shard_sequence(labels, rank, pcp, seq_dim=1))
        loss = losses.sum()
        loss.backward()
        total = loss.detach().clone()
        grads = {name: param.grad for name, param in model.named_parameters()}
        if pcp > 1:
            dist.all_reduce(total, group=groups.pcp_group)
            for grad in grads.values():
                dist.all_reduce(grad, group=groups.pcp_group)
        return float(total), grads, model.shape
    finally:
        destroy_model_parallel()


def _as_hf(grads: dict, shape: GPTShape, hf_grads: dict) -> dict:
    """transformers' gradients arranged as cptoolkit's full parameters (fc1 = [gate; up])."""
    return {name: torch.cat([hf_grads[piece.name][piece.start:piece.stop] for piece in pieces])
            for name, pieces in DEEPSEEK.layout(shape, ()).items() if name in grads}


def _mla_rank(rank, world_size, cases):
    out = defaultdict(dict)
    for name, (directory, prompts, _, logits32, logits64, ids, labels, _, hf_grads) in cases.items():
        for layout in LAYOUTS.get(world_size, ()):
            tokens, logits, bytes_per_block, width, planes, cached = _generate(_engine_config(directory, *layout),
                                                                              prompts)
            out["float32"][name, layout] = (tokens, _relative(logits, logits32), bytes_per_block, width, planes,
                                            cached)
        tp, pcp, dcp = FLOAT64_DECODE[world_size]
        tokens, logits, *_ = _generate(_engine_config(directory, tp, pcp, dcp, "p2p", "a2a"), prompts)
        out["decode vs float64"][name] = _relative(logits, logits64)
        for comm in TRAIN_COMMS.get(world_size, ()):
            loss, grads, shape = _train_step(directory, world_size, comm, ids, labels)
            want = _as_hf(grads, shape, hf_grads)
            out["train vs float64"][name, comm] = (loss, {n: float((grads[n] - want[n]).abs().max()
                                                              / want[n].abs().max()) for n in want}, len(grads))
    return dict(out)


@pytest.fixture(scope="module")
def per_world_size(checkpoints):
    return {world_size: run_ranks(world_size, _mla_rank, checkpoints, timeout_s=400) for world_size in (1, 4, 8)}


@pytest.mark.parametrize("world_size", [1, 4])
def test_engine_generates_transformers_tokens_with_a_latent_only_cache(checkpoints, per_world_size, world_size):
    for rank, results in enumerate(per_world_size[world_size]):
        assert {name for name, _ in results["float32"]} == set(CASES)
        for (name, layout), (tokens, error, bytes_per_block, width, planes, cached) in results["float32"].items():
            label = f"rank {rank}, {name}, layout {layout}"
            assert tokens == checkpoints[name][2], f"{label}: {tokens} != transformers {checkpoints[name][2]}"
            assert error <= RTOL_FLOAT32, f"{label}: logits differ by {error:.3g} of transformers' largest"
            latent = SIZES["kv_lora_rank"] + SIZES["qk_rope_head_dim"]
            assert (width, planes) == (latent, 1), label  # one latent per token: no per-head K/V, no V copy
            assert bytes_per_block == SIZES["num_hidden_layers"] * 4 * latent * 4, label
            prefix_caching = layout[6]
            assert cached == ([0, 0, 16] if prefix_caching else [0, 0, 0]), f"{label}: cached prompt tokens {cached}"


@pytest.mark.parametrize("world_size", [1, 4, 8])
def test_absorbed_decode_equals_float64_transformers(per_world_size, world_size):
    for rank, results in enumerate(per_world_size[world_size]):
        for name, error in results["decode vs float64"].items():
            assert error <= RTOL_VS_FLOAT64, f"rank {rank}, {name}, {FLOAT64_DECODE[world_size]}: {error:.3g}"


@pytest.mark.parametrize("world_size", [1, 4])
def test_expanded_prefill_loss_and_gradients_equal_float64_transformers(checkpoints, per_world_size, world_size):
    for rank, results in enumerate(per_world_size[world_size]):
        assert {comm for _, comm in results["train vs float64"]} == set(TRAIN_COMMS[world_size])
        for (name, comm), (loss, errors, num_params) in results["train vs float64"].items():
            label = f"rank {rank}, {name}, PCP={world_size} {comm}"
            want_loss = checkpoints[name][7]
            assert abs(loss - want_loss) <= RTOL_VS_FLOAT64 * abs(want_loss), (label, loss, want_loss)
            assert len(errors) == num_params, (label, sorted(errors))  # every parameter compared
            worst = max(errors, key=errors.get)
            assert errors[worst] <= RTOL_VS_FLOAT64, f"{label}: gradient of {worst} differs by {errors[worst]:.3g}"


def test_moe_keys_transformers_ignores_and_bad_mla_fields_are_refused_in_one_line():
    config = transformers.DeepseekV3Config(**{**SIZES, "first_k_dense_replace": 1}).to_dict()
    with pytest.raises(ValueError, match=r"^moe_layer_freq=2; rule: must be 1 \(transformers makes every layer"):
        read_hf_config({**config, "moe_layer_freq": 2})
    v2 = transformers.DeepseekV2Config(**SIZES).to_dict()
    with pytest.raises(ValueError, match="attention_bias=True; rule: must be False"):
        read_hf_config({**v2, "attention_bias": True})
    with pytest.raises(ValueError, match="kv_lora_rank=0; rule: must be a positive integer"):
        read_hf_config({**v2, "kv_lora_rank": 0})
