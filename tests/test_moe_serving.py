"""The server's ``/metrics`` shows each MoE layer's per-expert load, so imbalance is visible: one counter per
(layer, expert), summing on each MoE layer to every token the model ran times top-k; a dense model has none."""
from __future__ import annotations

import re
from collections import defaultdict

import pytest
import torch

from tests.hf_checkpoints import MOE_FAMILIES, hf_model, save_checkpoint
from tests.inprocess_server import InProcessServer

pytest.importorskip("transformers")

SAMPLE = re.compile(r'^cptoolkit_moe_expert_tokens_total\{layer="(\d+)",expert="(\d+)"\} (\d+)$')


def _expert_load(text: str) -> dict[int, dict[int, int]]:
    load: dict[int, dict[int, int]] = defaultdict(dict)
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match:
            layer, expert, count = map(int, match.groups())
            load[layer][expert] = count
    return dict(load)


def test_metrics_count_every_routed_token_per_layer_and_expert(tmp_path):
    torch.manual_seed(0)
    name = "qwen3_moe"  # MoE on layer 2 of 3 (megatron's numbering), 8 experts, top-2
    directory = save_checkpoint(hf_model(name), tmp_path / name)
    prompt, max_tokens = " ".join(f"w{i}" for i in range(3, 14)), 5
    with InProcessServer(checkpoint=directory, max_seq_len=64) as server:
        assert _expert_load(server.get("/metrics").text) == {2: {e: 0 for e in range(8)}}
        body = server.post("/v1/completions", {"model": "tiny-gqa", "prompt": prompt, "max_tokens": max_tokens,
                                               "temperature": 0}).json()
        assert body["usage"]["completion_tokens"] == max_tokens, body
        text = server.get("/metrics").text
    assert "# TYPE cptoolkit_moe_expert_tokens_total counter" in text
    load = _expert_load(text)
    # The model ran the prompt's tokens and every generated token but the last, each routed to top-2 experts.
    ran = body["usage"]["prompt_tokens"] + max_tokens - 1
    assert set(load) == {2} and sum(load[2].values()) == 2 * ran, (load, body["usage"])
    assert len(MOE_FAMILIES[name][2]) > 0


def test_a_dense_model_has_no_expert_metric():
    with InProcessServer() as server:
        assert "moe_expert_tokens" not in server.get("/metrics").text
