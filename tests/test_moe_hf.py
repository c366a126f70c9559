"""Every Mixture-of-Experts family generates transformers' own greedy tokens, with transformers' logits (float32,
within 1e-5 of its largest logit), at one rank and at TP=2 x PCP=2 x DCP=4 with EP = 4 (every rank two or more
whole experts) and EP = 2 (experts TP-sliced), also through chunked prefill with prefix caching (every prompt
twice: the second run attends through reused pages); and the engine's per-expert load is the replica's whole load
on every rank.

The checkpoints are transformers' own tiny random models (``tests/hf_checkpoints.MOE_FAMILIES``): Mixtral,
Qwen2-MoE (shared expert with its sigmoid gate), Qwen3-MoE (renormalised top-k with MoE every other layer; plain
top-k with an mlp_only layer), DeepSeek-V2 (greedy; group-limited greedy, scaled), DeepSeek-V3 (sigmoid steered by
a random e_score_correction_bias, top-two group scores, renormalised, scaled, a dense first layer, MLA).
"""
import pytest
import torch

from cptoolkit.config import config_from_dict, model_moe
from cptoolkit.inference.builder import build_engine
from cptoolkit.inference.sampling import SamplingParams
from cptoolkit.moe.layer import expert_load
from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel
from tests.hf_checkpoints import MOE_FAMILIES, VOCAB, greedy_reference, hf_model, recorded_logits, save_checkpoint
from tests.multiproc import run_ranks

transformers = pytest.importorskip("transformers")

PROMPT_LENS = (21, 13)
MAX_NEW = 6
RTOL = 1e-5
# (tp, pcp, dcp, ep, prefill_chunk_size, prefix_caching, speculative_method): chunked prefill with prefix caching
# at EP = 4; speculative decoding with prompt-lookup drafts at EP = 2, and with the checkpoint as its own draft
# model (an MoE draft: every draft accepted, verification's multi-token decode through the experts) at one rank.
LAYOUTS = ((2, 2, 4, 4, None, False, None), (2, 2, 4, 2, None, False, "ngram"), (2, 2, 4, 4, 8, True, None))
SINGLE_RANK = ((1, 1, 1, None, None, False, None), (1, 1, 1, None, 8, True, "draft_model"))


@pytest.fixture(scope="module")
def moe_cases(tmp_path_factory):
    """{family: (checkpoint_dir, prompts, transformers' greedy tokens, transformers' logits per new token)}."""
    cases = {}
    for seed, name in enumerate(MOE_FAMILIES):
        torch.manual_seed(100 + seed)
        model = hf_model(name)
        directory = save_checkpoint(model, tmp_path_factory.mktemp(name))
        prompts = [torch.randint(2, VOCAB, (n,)).tolist() for n in PROMPT_LENS]
        tokens, logits = greedy_reference(model, prompts, MAX_NEW)
        cases[name] = (directory, prompts, tokens, logits)
    return cases


def _moe_rank(rank, world_size, cases):
    results = {}
    for name, (directory, prompts, _, want_logits) in cases.items():
        for tp, pcp, dcp, ep, chunk, caching, speculative in (SINGLE_RANK if world_size == 1 else LAYOUTS):
            draft = {"speculative_method": speculative, "num_speculative_tokens": 3,
                     "speculative_model": directory if speculative == "draft_model" else None}
            cfg = config_from_dict({
                "parallel": dict(tp=tp, pcp=pcp, dcp=dcp, ep=ep), "model": {"checkpoint": directory},
                "runtime": {"device": "cpu"},
                "inference": {"prompts": ["unused"], "batch_size": 2, "kv_block_size": 4,
                              "prefill_chunk_size": chunk, "prefix_caching": caching, **draft}}, source="<test>")
            repeats = 2 if caching else 1
            groups = initialize_model_parallel(tp=tp, pcp=pcp, dcp=dcp, num_heads=cfg.model.num_attention_heads,
                                               num_kv_heads=cfg.model.num_kv_heads, ep=ep,
                                               num_experts=model_moe(cfg.model).num_experts)
            try:
                engine = build_engine(cfg, groups, torch.device("cpu"))
                got_logits = recorded_logits(engine)
                generated = engine.generate(prompts * repeats, SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW))
                load = expert_load(engine.model)
            finally:
                destroy_model_parallel()
            # With drafts, tokens come from verification, not from the sampling step the recording wraps.
            diffs = [] if speculative else [
                (torch.stack(got_logits[index]).double() - want.double()).abs() / want.abs().max()
                for index, want in enumerate(want_logits * repeats)]
            results[name, (tp, pcp, dcp, ep, chunk, caching, speculative)] = {
                "tokens": [r.token_ids for r in generated], "cached": sum(r.metrics.cached_prompt_tokens
                                                                         for r in generated),
                "max_err": max((float(d.max()) for d in diffs), default=None), "load": load,
                "drafts": engine.metrics.accepted_draft_tokens}
    return results


def _check(cases, per_rank):
    for rank, results in enumerate(per_rank):
        for (name, layout), got in results.items():
            label, want_tokens = f"rank {rank}, {name}, layout {layout}", cases[name][2]
            caching, speculative = layout[-2:]
            repeats = 2 if caching else 1
            assert got["tokens"] == want_tokens * repeats, f"{label}: {got['tokens']} != transformers {want_tokens}"
            assert (got["cached"] > 0) == caching, (label, got["cached"])
            if speculative == "draft_model":  # its own draft: every draft accepted
                assert got["drafts"] > 0, label
            if speculative is None:
                assert got["max_err"] <= RTOL, f"{label}: logits differ by {got['max_err']:.3g} of the largest"
            assert got["load"] == per_rank[0][name, layout]["load"], f"{label}: expert load differs from rank 0's"
            assert all(sum(counts) > 0 for counts in got["load"].values()), (label, got["load"])


def test_moe_families_generate_transformers_tokens_at_one_rank(moe_cases):
    _check(moe_cases, run_ranks(1, _moe_rank, moe_cases, timeout_s=240))


def test_moe_families_generate_transformers_tokens_at_tp2_pcp2_dcp4_ep4_and_ep2(moe_cases):
    _check(moe_cases, run_ranks(4, _moe_rank, moe_cases, timeout_s=480))
