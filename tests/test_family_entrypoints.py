"""Every family of the families table in docs/families.md runs end to end through both entry points, so an entry point
cannot break for one family (the sliding-window families once crashed both: ``HybridKVCache`` lacked what
``cptoolkit generate`` and ``cptoolkit serve`` read). On a tiny checkpoint that transformers made
(``tests/hf_checkpoints.py``), for each family:

- ``cptoolkit generate MODEL --prompt ...`` exits 0 and its JSON holds the requested number of tokens;
- ``cptoolkit serve MODEL`` answers a completion over HTTP with the same greedy tokens, then SIGTERM drains it
  to exit status 0.

The 1-rank jobs run ``cptoolkit.cli.main`` in a child of the tests' forkserver (``tests/cli_jobs.py``); one
windowed family also runs at 2 ranks (PCP2 x DCP2, its rings sharded over DCP) through the console script and
the torchrun it starts.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from tests.cli_jobs import JOB_TIMEOUT_S, generate, serving
from tests.hf_checkpoints import FAMILIES, VOCAB, hf_model, perturbed, save_checkpoint, transformers

REPO = Path(__file__).resolve().parents[1]
CLI = [str(Path(sys.executable).with_name("cptoolkit"))]
# docs/families.md's architecture -> the checkpoints of it that run here (Mistral with and without its window).
CHECKPOINTS = {"LlamaForCausalLM": ("llama",), "MistralForCausalLM": ("mistral", "mistral_swa"),
               "Qwen2ForCausalLM": ("qwen2_swa",), "Qwen3ForCausalLM": ("qwen3",), "Gemma2ForCausalLM": ("gemma2",),
               "Gemma3ForCausalLM": ("gemma3",), "GPT2LMHeadModel": ("gpt2",),
               "DeepseekV2ForCausalLM": ("deepseek_v2",), "DeepseekV3ForCausalLM": ("deepseek_v3",),
               "Phi3ForCausalLM": ("phi3",)}
NAMES = [name for names in CHECKPOINTS.values() for name in names]
# Every layer dense (the MoE families run in tests/test_moe_hf.py); V2 without a query bottleneck, V3 with one.
MLA_SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, first_k_dense_replace=2,
                 max_position_embeddings=64, initializer_range=0.2, bos_token_id=1, eos_token_id=None,
                 pad_token_id=0)
MLA = {"deepseek_v2": ("DeepseekV2", dict(q_lora_rank=None)), "deepseek_v3": ("DeepseekV3", dict(q_lora_rank=32))}
PROMPT = "w5 w9 w2 w33 w17 w8 w40 w3 w11 w29 w6 w51"  # 12 tokens: past every family's window
MAX_TOKENS = 6


def _model(name: str):
    if name in MLA:
        family, arguments = MLA[name]
        config = getattr(transformers, f"{family}Config")(**MLA_SIZES, **arguments)
        return perturbed(getattr(transformers, f"{family}ForCausalLM")(config))
    return hf_model(name)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    made = {}
    for seed, name in enumerate(NAMES):
        torch.manual_seed(seed)
        made[name] = save_checkpoint(_model(name), tmp_path_factory.mktemp(name))
    return made


def test_every_family_of_the_docs_table_is_run_here():
    table = (REPO / "docs" / "families.md").read_text().split("| family | what it brings |", 1)[1].split("\n\n", 1)[0]
    architectures = set(re.findall(r"`(\w+(?:ForCausalLM|LMHeadModel))`", table))
    assert architectures == set(CHECKPOINTS), architectures ^ set(CHECKPOINTS)
    assert set(NAMES) - set(MLA) <= set(FAMILIES)


# ----------------------------------------------------------------------------- one rank, in a forked child

@pytest.mark.parametrize("name", NAMES)
def test_generate_and_serve_give_the_same_tokens(checkpoints, name, tmp_path):
    args = [checkpoints[name], "--max-model-len", "64", "--max-num-seqs", "2"]
    (request,) = generate([*args, "--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS)], tmp_path)["requests"]
    assert len(request["token_ids"]) == MAX_TOKENS and request["error"] is None, request
    with serving([*args, "--served-model-name", name], tmp_path / "serve.log") as url:
        answer = httpx.post(f"{url}/v1/completions", timeout=JOB_TIMEOUT_S, json={
            "model": name, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}).json()
    assert answer["usage"]["completion_tokens"] == MAX_TOKENS, answer
    assert answer["choices"][0]["text"] == request["text"], (answer, request)


# ----------------------------------------------------------------------------- two ranks, under torchrun

def test_a_windowed_family_at_pcp2_dcp2_generates_the_one_rank_tokens(checkpoints, tmp_path):
    args = [checkpoints["gemma2"], "--max-model-len", "64", "--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS)]
    (one_rank,) = generate(args, tmp_path)["requests"]
    output = tmp_path / "two.json"
    done = subprocess.run([*CLI, "generate", *args, "-pcp", "2", "-dcp", "2", "--output", str(output)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    (two_ranks,) = json.loads(output.read_text())["requests"]
    assert two_ranks["token_ids"] == one_rank["token_ids"], (two_ranks, one_rank)
