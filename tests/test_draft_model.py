"""Speculative decoding with a draft model (``inference.speculative_method: draft_model``, ``inference.draft_model``).

- config: the draft checkpoint must exist, have the target's vocabulary size, split over ``parallel.tp`` and have
  positions for the longest request; ``speculative_model`` goes with ``draft_model`` only; a relative path is the
  config file's folder's, ``--speculative-config``'s ``model`` the working directory's;
- engine: greedy tokens and logprobs equal plain decoding's at 1 rank, TP2xPCP1xDCP2, TP1xPCP2xDCP2 and
  TP2xPCP2xDCP4 (chunked prefill and prefix caching on, each prompt run twice so the second run reuses cached
  pages in both caches), target ``tiny-gqa`` with three drafts: its first layer alone (a smaller checkpoint),
  ``tiny-mqa`` (other heads: one KV head, replicated over TP) and ``tiny-gqa`` itself, whose every draft must be
  accepted;
- sampled speculative decoding draws the same tokens at every layout and rank for one seed.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.speculative import first_layers
from cptoolkit import cli
from cptoolkit.config import ConfigError, config_from_dict
from cptoolkit.inference.builder import build_engine
from cptoolkit.inference.sampling import SamplingParams
from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel
from tests.multiproc import run_ranks

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "checkpoints" / "tiny-gqa"
PROMPTS = ["The cat sat on", "12 + 7 =", "one two three", "A red ball"]
MAX_NEW = 16
LAYOUTS = [(1, 1, 1), (2, 1, 2), (1, 2, 2), (2, 2, 4)]  # TP x PCP x DCP; world size TP x PCP


def _raw(speculative: dict, tp: int = 1, pcp: int = 1, dcp: int = 1) -> dict:
    return {"parallel": dict(tp=tp, pcp=pcp, dcp=dcp), "model": {"checkpoint": str(TARGET)},
            "runtime": {"device": "cpu", "dtype": "float32"},
            "inference": {"prompts": ["unused"], "batch_size": 4, "max_seq_len": 128, "kv_block_size": 4,
                          "prefill_chunk_size": 16, "prefix_caching": True, "num_speculative_tokens": 3,
                          **speculative}}


def _draft_config(tmp_path: Path, **changes) -> Path:
    """A draft directory holding tiny-mqa's config.json with ``changes`` (validation reads no weights)."""
    config = json.loads((REPO / "checkpoints" / "tiny-mqa" / "config.json").read_text())
    directory = tmp_path / "draft"
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({**config, **changes}))
    return directory


def _draft(path) -> dict:
    return {"speculative_method": "draft_model", "speculative_model": str(path)}


def test_the_draft_checkpoint_is_checked_against_the_target(tmp_path):
    with pytest.raises(ConfigError, match=r"^<t>: inference.speculative_model = None: the draft checkpoint's "
                                          r"directory: required with speculative_method 'draft_model'"):
        config_from_dict(_raw({"speculative_method": "draft_model"}), source="<t>")
    with pytest.raises(ConfigError, match=r"allowed with nothing else \(speculative_method is 'ngram'\)"):
        config_from_dict(_raw({"speculative_method": "ngram", "speculative_model": str(TARGET)}), source="<t>")
    with pytest.raises(ConfigError, match=r"inference.speculative_model = '/no/such': no config.json in /no/such "
                                          r"\(no such directory\); point it at the draft checkpoint's directory"):
        config_from_dict(_raw(_draft("/no/such")), source="<t>")
    with pytest.raises(ConfigError, match=r"its vocab_size \(300\) must equal the target's \(320\): a draft model "
                                          r"proposes token ids of the target's vocabulary"):
        config_from_dict(_raw(_draft(_draft_config(tmp_path / "v", vocab_size=300))), source="<t>")
    with pytest.raises(ConfigError, match=r"the draft runs on the target's layout \(parallel.tp = 2, pcp = 1, "
                                          r"dcp = 2\), and its heads or MLP do not split over it: num_heads \(3\) "
                                          r"must be a multiple of tp \(2\)"):
        config_from_dict(_raw(_draft(_draft_config(tmp_path / "h", num_attention_heads=3, hidden_size=48)), tp=2,
                              dcp=2), source="<t>")
    with pytest.raises(ConfigError, match=r"its max_position_embeddings \(64\) must be >= the longest request, "
                                          r"inference.max_seq_len \(or the target's max_seq_len\) = 128"):
        config_from_dict(_raw(_draft(_draft_config(tmp_path / "p", max_position_embeddings=64))), source="<t>")


def test_a_relative_draft_path_is_the_config_folders_and_the_cli_key_is_model(monkeypatch, tmp_path):
    cfg = config_from_dict(_raw(_draft("checkpoints/tiny-mqa")), source="<t>", base_dir=REPO)
    assert cfg.inference.speculative_model == str(REPO / "checkpoints" / "tiny-mqa")
    monkeypatch.chdir(REPO)
    _, cfg = cli.merged_config(cli.build_parser().parse_args([
        "generate", "checkpoints/tiny-gqa", "--speculative-config",
        '{"method": "draft_model", "model": "checkpoints/tiny-mqa", "num_speculative_tokens": 3}']))
    inference = cfg.inference
    assert (inference.speculative_method, inference.speculative_model, inference.num_speculative_tokens) == \
        ("draft_model", str(REPO / "checkpoints" / "tiny-mqa"), 3)


def _params(temperature: float = 0.0) -> list[SamplingParams]:
    return [SamplingParams(temperature=temperature, seed=5, max_new_tokens=MAX_NEW),
            SamplingParams(temperature=temperature, seed=5, max_new_tokens=MAX_NEW, logprobs=2),
            SamplingParams(temperature=temperature, seed=5, max_new_tokens=MAX_NEW - 5),
            SamplingParams(temperature=temperature, seed=5, max_new_tokens=MAX_NEW)]


def _engine(layout, speculative: dict):
    cfg = config_from_dict(_raw(speculative, *layout), source="<test>")
    groups = initialize_model_parallel(*layout, num_heads=cfg.model.num_attention_heads,
                                       num_kv_heads=cfg.model.num_kv_heads)
    return build_engine(cfg, groups, torch.device("cpu"))


def _run(engine, prompts, params):
    results = engine.generate(prompts, params)
    return {"tokens": [r.token_ids for r in results], "logprobs": results[1].logprobs,
            "cached": sum(r.metrics.cached_prompt_tokens for r in results)}


def _draft_rank(rank, world_size, layout: tuple[int, int, int], drafts: dict[str, str]):
    engine = _engine(layout, {})
    try:
        base = [engine.tokenizer.encode(p) for p in PROMPTS]
        # Each prompt followed by its own greedy continuation: prompts long enough for several chunks and pages.
        prompts = [b + r.token_ids for b, r in zip(base, engine.generate(base, SamplingParams(max_new_tokens=20)))]
        out = {"plain": _run(engine, prompts, _params())}
    finally:
        destroy_model_parallel()
    for name, path in drafts.items():
        engine = _engine(layout, _draft(path))
        try:
            out[name] = [_run(engine, prompts, _params()) for _ in range(2)]  # the second reuses cached pages
            out[name, "drafts"] = (engine.metrics.draft_tokens, engine.metrics.accepted_draft_tokens)
            out[name, "sampled"] = _run(engine, prompts, _params(temperature=0.9))["tokens"]
        finally:
            destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def draft_runs(tmp_path_factory):
    first_layer = first_layers(TARGET, 1, tmp_path_factory.mktemp("draft") / "tiny-gqa-1-layer")
    drafts = {"first layer": str(first_layer), "tiny-mqa": str(REPO / "checkpoints" / "tiny-mqa"),
              "itself": str(TARGET)}
    return {layout: run_ranks(layout[0] * layout[1], _draft_rank, layout, drafts, timeout_s=300) for layout in LAYOUTS}


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: "TP{}xPCP{}xDCP{}".format(*layout))
def test_greedy_draft_model_tokens_equal_plain_decoding(draft_runs, layout):
    for rank, out in enumerate(draft_runs[layout]):
        plain = out["plain"]
        for name in ("first layer", "tiny-mqa", "itself"):
            label = f"rank {rank}, TPxPCPxDCP {layout}, draft {name}"
            for run, speculative in enumerate(out[name]):
                assert speculative["tokens"] == plain["tokens"], (label, run)
                error = max(abs(a.logprob - b.logprob) for a, b in zip(plain["logprobs"], speculative["logprobs"]))
                assert error < 1e-5 and [[t for t, _ in lp.top] for lp in speculative["logprobs"]] == \
                    [[t for t, _ in lp.top] for lp in plain["logprobs"]], (label, run, error)
            assert out[name][1]["cached"] > 0, label  # the second run reused prefix pages
            drafts, accepted = out[name, "drafts"]
            if name == "itself":  # the target as its own draft: every draft is what the target says
                assert drafts > 0 and accepted == drafts, (label, accepted, drafts)
            else:  # both paths run: some drafts accepted, some rejected
                assert 0 < accepted < drafts, (label, accepted, drafts)


def test_sampled_draft_model_tokens_are_the_same_at_every_layout(draft_runs):
    reference = draft_runs[1, 1, 1][0]
    for layout, per_rank in draft_runs.items():
        for rank, out in enumerate(per_rank):
            for name in ("first layer", "tiny-mqa", "itself"):
                assert out[name, "sampled"] == reference[name, "sampled"], (layout, rank, name)
                assert out[name, "drafts"] == per_rank[0][name, "drafts"], (layout, rank, name)
