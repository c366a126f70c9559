"""The megatron-core GPT model with cptoolkit attention: one seed gives one model for every TP size,
the loss is megatron's vocab-parallel cross entropy, and PCP = 2 prefill followed by DCP = 2 decode
reproduces the single-rank model's logits token for token.

Every multi-rank check runs inside one 2-rank gloo job; each rank also builds the unsharded
single-rank model (TP = PCP = DCP = 1, on a one-rank group) as its reference.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection

from cptoolkit.layers.core_attention import AttentionPhase, AttentionRuntime
from cptoolkit.layers.dcp_decode import ContiguousShardCache, DecodeGroup
from cptoolkit.layers.dual_chunk_swap import padded_length, shard_positions, shard_sequence, unshard_sequence
from cptoolkit.models.build import build_gpt_model, new_gpt_model
from cptoolkit.models.gpt import gpt_forward
from cptoolkit.models.families.registry import read_hf_config, write_hf_config
from cptoolkit.models.shape import GPTShape
from cptoolkit.models.tp_sharding import gather_full_state_dict
from tests.multiproc import run_ranks

SEED = 7
# build_gpt_model's N(0, 0.02²) init leaves attention nearly uniform: swapping two RoPE positions moves the
# logits by ~3e-3 while they are ~0.6. Ten times larger weights (std 0.2) make attention, and so every
# position, matter: the same swap moves them by ~5 (logits ~5), far above float32 rounding (~3e-6).
INIT_SCALE = 10.0
# Logits, losses and gradients agree to this fraction of the reference's largest magnitude (measured
# worst: 1.4e-6, DCP=2 decode of the Llama model).
RTOL = 1e-5
LLAMA = GPTShape("llama", num_layers=2, hidden_size=64, num_attention_heads=8, num_kv_heads=2,
                 ffn_hidden_size=96, vocab_size=101, max_seq_len=32, rope_theta=500.0, norm_eps=1e-6)
LLAMA_MQA_TIED = GPTShape("llama", num_layers=1, hidden_size=32, num_attention_heads=4, num_kv_heads=1,
                          ffn_hidden_size=64, vocab_size=64, max_seq_len=32, tie_embeddings=True)
GPT2 = GPTShape("gpt2", num_layers=2, hidden_size=32, num_attention_heads=4, num_kv_heads=4,
                ffn_hidden_size=128, vocab_size=77, max_seq_len=32, tie_embeddings=True)
TOTAL_LEN = 16
PROMPT_LENS = (11, 8)  # two requests of different lengths: decode rows sit at different positions


def _diff(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float, float]:
    """``(max, mean)`` of ``|got - want|`` and the reference's largest magnitude ``max |want|``."""
    diff = (got.detach().double() - want.detach().double()).abs()
    return float(diff.max()), float(diff.mean()), float(want.detach().abs().max())


def megatron_groups(tp_group: dist.ProcessGroup, solo: dist.ProcessGroup) -> ProcessGroupCollection:
    """megatron's groups for a model sharded over ``tp_group``, laid out as
    ``ParallelGroups.megatron_pg_collection`` lays them out: every other group is this rank alone (``solo``)."""
    return ProcessGroupCollection(tp=tp_group, cp=solo, pp=solo, embd=solo, pos_embd=solo)


def _build(shape: GPTShape, pg_collection: ProcessGroupCollection, runtime: AttentionRuntime):
    """``build_gpt_model`` with every weight matrix scaled by INIT_SCALE (shards scale like the full
    tensors, so every TP size still holds the same model)."""
    model = build_gpt_model(shape, pg_collection, runtime, seed=SEED)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.mul_(INIT_SCALE)
    return model


def _tokens(shape: GPTShape, batch: int = 2) -> torch.Tensor:
    return torch.randint(shape.vocab_size, (batch, TOTAL_LEN), generator=torch.Generator().manual_seed(1))


def _positions(batch: int, seq_len: int) -> torch.Tensor:
    return torch.arange(seq_len).expand(batch, seq_len)


def _tp_checks(shape: GPTShape, solo: dist.ProcessGroup) -> dict:
    """TP = 2 (the world) against TP = 1 (this rank alone), same seed."""
    tokens = _tokens(shape)
    inputs, labels, positions = tokens[:, :-1], tokens[:, 1:], _positions(2, TOTAL_LEN - 1)
    models = {name: _build(shape, megatron_groups(group, solo), runtime)
              for name, group, runtime in (("tp1", solo, AttentionRuntime()),
                                           ("tp2", dist.group.WORLD, AttentionRuntime()))}
    logits = {name: gpt_forward(m, inputs, positions, AttentionRuntime()) for name, m in models.items()}
    swapped = positions.clone()
    swapped[:, [3, 4]] = swapped[:, [4, 3]]
    with torch.no_grad():
        swapped_logits = gpt_forward(models["tp1"], inputs, swapped, AttentionRuntime())
    losses = {name: gpt_forward(m, inputs, positions, AttentionRuntime(), labels=labels)
              for name, m in models.items()}
    for loss in losses.values():
        loss.sum().backward()
    want_loss = F.cross_entropy(logits["tp1"].double().flatten(0, 1), labels.flatten(), reduction="none")
    full = {name: gather_full_state_dict(m) for name, m in models.items()}
    picked = torch.tensor([TOTAL_LEN - 2, 3])  # one token per sequence: logits of those rows only
    picked_logits = gpt_forward(models["tp2"], inputs, positions, AttentionRuntime(), logits_index=picked)
    return {
        "tp2 logits_index vs full logits": _diff(picked_logits[:, 0], logits["tp2"][torch.arange(2), picked]),
        "logits shape": tuple(logits["tp2"].shape),
        "tp2 vs tp1 logits": _diff(logits["tp2"], logits["tp1"]),
        "tp1 loss vs float64 cross entropy": _diff(losses["tp1"].flatten(), want_loss),
        "tp2 vs tp1 loss": _diff(losses["tp2"], losses["tp1"]),
        "tp2 vs tp1 final norm grad": _diff(models["tp2"].decoder.final_layernorm.weight.grad,
                                            models["tp1"].decoder.final_layernorm.weight.grad),
        "tp2 vs tp1 full weights": max(_diff(full["tp2"][n], full["tp1"][n])[0] for n in full["tp1"]),
        "positions 3 and 4 swapped vs in order": _diff(swapped_logits, logits["tp1"]),
    }


def _fill_caches_hook(caches: dict, pcp_group: dist.ProcessGroup, seq_lens: torch.Tensor):
    """on_prefill_kv: gather every PCP rank's DualChunkSwap K/V shard and keep this rank's DCP shard."""
    def hook(layer_number: int, k: torch.Tensor, v: torch.Tensor) -> None:
        shards = [torch.empty_like(torch.stack([k, v])) for _ in range(pcp_group.size())]
        dist.all_gather(shards, torch.stack([k, v]).contiguous(), group=pcp_group)
        k_full, v_full = unshard_sequence(torch.stack(shards), pcp_group.size(), seq_dim=3)
        caches[layer_number].write_prefix(k_full, v_full, seq_lens)
    return hook


def _pcp_dcp_checks(shape: GPTShape, solo: dist.ProcessGroup, prefill_comm: str, decode_comm: str) -> dict:
    """PCP = 2 prefill of two prompts, then DCP = 2 decode of the rest, against the single-rank
    model on the whole sequences (TP = 1 so PCP = DCP = world)."""
    world, pcp_rank, pcp_size = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    tokens = _tokens(shape)
    reference = _build(shape, megatron_groups(solo, solo), AttentionRuntime())
    want = gpt_forward(reference, tokens, _positions(2, TOTAL_LEN), AttentionRuntime())

    dg = DecodeGroup.from_group(world, tp_positions=1, pcp_size=pcp_size)
    runtime = AttentionRuntime(pcp_group=world, decode_group=dg, prefill_comm=prefill_comm,
                               decode_comm=decode_comm)
    model = _build(shape, megatron_groups(solo, solo), runtime)
    seq_lens = torch.tensor(PROMPT_LENS)
    caches = {layer: ContiguousShardCache(shape.max_seq_len, 2, shape.num_kv_heads, shape.head_dim, dg)
              for layer in range(1, shape.num_layers + 1)}
    prefill = AttentionPhase(on_prefill_kv=_fill_caches_hook(caches, world, seq_lens))
    seq_len_padded = padded_length(max(PROMPT_LENS), pcp_size)
    prompts = tokens[:, :seq_len_padded].clone()
    prompts[1, PROMPT_LENS[1]:] = 0  # padding at the end never reaches a real token
    local_positions = shard_positions(seq_len_padded, pcp_rank, pcp_size).expand(2, -1)
    with torch.no_grad():
        local_logits = gpt_forward(model, shard_sequence(prompts, pcp_rank, pcp_size, seq_dim=1),
                                   local_positions, runtime, phase=prefill)
    gathered = [torch.empty_like(local_logits) for _ in range(pcp_size)]
    dist.all_gather(gathered, local_logits, group=world)
    prefill_logits = unshard_sequence(torch.stack(gathered), pcp_size, seq_dim=1)
    checks = {f"prefill row {row}": _diff(prefill_logits[row, :n], want[row, :n])
              for row, n in enumerate(PROMPT_LENS)}

    positions = seq_lens.clone()
    decode_diffs = []
    while int(positions.max()) < TOTAL_LEN:
        decode = AttentionPhase(mode="decode", kv_caches=caches, decode_positions=positions)
        with torch.no_grad():
            logits = gpt_forward(model, tokens.gather(1, positions[:, None]), positions[:, None], runtime,
                                 phase=decode)
        decode_diffs.append(_diff(logits[:, 0], want[torch.arange(2), positions]))
        positions = positions + 1
    checks["decode steps"] = len(decode_diffs)
    checks["decode worst"] = max(decode_diffs)
    try:
        gpt_forward(model, tokens[:, :2], _positions(2, 2), runtime, phase=decode)
    except ValueError as error:
        checks["two tokens in decode"] = str(error)
    return checks


def _model_rank(rank, world_size):
    solo = dist.new_group([rank], use_local_synchronization=True)
    results = {arch: _tp_checks(shape, solo) for arch, shape in
               (("llama", LLAMA), ("llama_mqa_tied", LLAMA_MQA_TIED), ("gpt2", GPT2))}
    results["pcp_dcp llama p2p/a2a"] = _pcp_dcp_checks(LLAMA, solo, "p2p", "a2a")
    results["pcp_dcp gpt2 all_gather/ag_rs"] = _pcp_dcp_checks(GPT2, solo, "all_gather", "ag_rs")
    return results


@pytest.fixture(scope="module")
def rank_results():
    return run_ranks(2, _model_rank, timeout_s=240)


@pytest.mark.parametrize("arch,shape", [("llama", LLAMA), ("llama_mqa_tied", LLAMA_MQA_TIED), ("gpt2", GPT2)])
def test_same_seed_gives_the_same_model_logits_loss_and_grads_at_tp1_and_tp2(rank_results, arch, shape):
    for rank, results in enumerate(rank_results):
        r = results[arch]
        assert r["logits shape"] == (2, TOTAL_LEN - 1, shape.vocab_size)
        assert r["tp2 vs tp1 full weights"] == 0.0, f"rank {rank}: {r}"
        for key in ("tp2 vs tp1 logits", "tp1 loss vs float64 cross entropy", "tp2 vs tp1 loss",
                    "tp2 vs tp1 final norm grad", "tp2 logits_index vs full logits"):
            max_diff, mean_diff, scale = r[key]
            assert max_diff <= RTOL * scale, (f"rank {rank} {arch} {key}: max {max_diff:.3g}, "
                                              f"mean {mean_diff:.3g}, reference max {scale:.3g}")
        # The tolerance sees a position error: two swapped RoPE / learned positions move the logits by far more.
        max_diff, mean_diff, scale = r["positions 3 and 4 swapped vs in order"]
        assert max_diff > 1000 * RTOL * scale, f"rank {rank} {arch}: a position swap moves logits {max_diff:.3g}"


@pytest.mark.parametrize("case", ["pcp_dcp llama p2p/a2a", "pcp_dcp gpt2 all_gather/ag_rs"])
def test_pcp2_prefill_then_dcp2_decode_equals_the_single_rank_model(rank_results, case):
    for rank, results in enumerate(rank_results):
        r = results[case]
        assert r["decode steps"] == TOTAL_LEN - max(PROMPT_LENS)
        # Several tokens per sequence are speculative decoding's verification: they need a position each.
        assert r["two tokens in decode"] == ("decode of 2 tokens per sequence needs decode_positions shaped like "
                                             "input_ids (2, 2); got (2,)")
        for key in ("prefill row 0", "prefill row 1", "decode worst"):
            max_diff, mean_diff, scale = r[key]
            assert max_diff <= RTOL * scale, (f"rank {rank} {case} {key}: max {max_diff:.3g}, "
                                              f"mean {mean_diff:.3g}, reference max {scale:.3g}")


def test_shape_validation_names_field_value_and_rule():
    cases = [
        (dict(arch="bert"), r"GPTShape.arch='bert' is not supported; rule: one of \('llama', 'gpt2'\)"),
        (dict(num_layers=0), r"GPTShape.num_layers=0; rule: must be a positive integer"),
        (dict(norm_eps=0.0), r"GPTShape.norm_eps=0.0; rule: must be > 0"),
        (dict(hidden_size=60), r"GPTShape.hidden_size=60 must be a multiple of num_attention_heads=8"),
        (dict(num_kv_heads=3), r"GPTShape.num_attention_heads=8 must be a multiple of num_kv_heads=3"),
    ]
    fields = dict(arch="llama", num_layers=2, hidden_size=64, num_attention_heads=8, num_kv_heads=2,
                  ffn_hidden_size=96, vocab_size=101, max_seq_len=32)
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            GPTShape(**{**fields, **change})
    with pytest.raises(ValueError, match=r"GPTShape.num_kv_heads=2; rule: gpt2 has one KV head per query head"):
        GPTShape(**{**fields, "arch": "gpt2"})


def _tp_of_size(size: int) -> SimpleNamespace:
    """Stands in for a pg_collection with a TP group of ``size`` ranks: the TP rules are checked before
    any group is used."""
    return SimpleNamespace(tp=SimpleNamespace(size=lambda: size))


def test_tp_rules_are_checked_when_the_model_is_built():
    with pytest.raises(ValueError, match=r"num_attention_heads=8 must be a multiple of TP=3"):
        new_gpt_model(LLAMA, _tp_of_size(3), AttentionRuntime())
    with pytest.raises(ValueError, match=r"num_kv_heads=3 must be a multiple or a divisor of TP=4"):
        new_gpt_model(GPTShape(**{**LLAMA.__dict__, "num_attention_heads": 12, "num_kv_heads": 3,
                                  "hidden_size": 96}), _tp_of_size(4), AttentionRuntime())
    with pytest.raises(ValueError, match=r"ffn_hidden_size=96 must be a multiple of TP=64"):
        new_gpt_model(GPTShape(**{**LLAMA.__dict__, "num_attention_heads": 64, "num_kv_heads": 64,
                                  "hidden_size": 128}), _tp_of_size(64), AttentionRuntime())


def test_hf_config_round_trip_and_unsupported_configs():
    for shape in (LLAMA, LLAMA_MQA_TIED, GPT2):
        assert read_hf_config(write_hf_config(shape)) == shape
    llama = write_hf_config(LLAMA)
    with pytest.raises(ValueError, match=r"model_type='gemma' is not supported; rule: one of 'llama', 'mistral'"):
        read_hf_config({**llama, "model_type": "gemma"})
    with pytest.raises(ValueError, match=r"missing required key 'factor'"):
        read_hf_config({**llama, "rope_parameters": {"rope_theta": 1e4, "rope_type": "llama3"}})
    with pytest.raises(ValueError, match=r"hidden_act='gelu'; rule: must be 'silu'"):
        read_hf_config({**llama, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match=r"head_dim=7; rule: must be even for llama \(RoPE rotates pairs"):
        read_hf_config({**llama, "head_dim": 7})
    assert read_hf_config({**llama, "head_dim": 16}).head_dim == 16  # Qwen3 style: != hidden / heads
    with pytest.raises(ValueError, match=r"activation_function='relu'; rule: must be the tanh GELU"):
        read_hf_config({**write_hf_config(GPT2), "activation_function": "relu"})
