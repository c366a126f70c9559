"""checkpoints/tiny-moe, the mixture of experts the project ships (tiny-gqa upcycled into 4 experts, top-2, then
fine-tuned by configs/train_tiny_moe.yaml): its experts are no longer copies of one MLP, its routing spreads the
tokens over every expert, and ``cptoolkit generate`` prints the same greedy text on one rank and at TP=2 x PCP=2 x
DCP=4 with EP=4 (configs/tiny_moe.yaml), which ``cptoolkit serve`` answers too.

``python -m tests.test_tiny_moe`` prints the figures these tests assert on (checkpoints/README.md quotes them).
"""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import httpx
import torch

from tests.cli_jobs import JOB_TIMEOUT_S, generate, serving
from tests.multiproc import run_ranks

REPO = Path(__file__).resolve().parents[1]
MOE = REPO / "checkpoints" / "tiny-moe"
DENSE = REPO / "checkpoints" / "tiny-gqa"
CLI = [str(Path(sys.executable).with_name("cptoolkit"))]
# Batches of the training corpus (configs/train_tiny_moe.yaml's) at steps training never drew (it drew 0 .. 299).
EVAL_STEPS = range(10_000, 10_040)
MICRO_BATCH, SEQ_LEN = 8, 128
PROMPTS = ["the old man", "my sister likes", "count: 3 4", "12 plus 7 is"]
MAX_TOKENS = 32


# ----------------------------------------------------------------------------- the weights and the routing

def expert_spread(checkpoint: Path) -> dict[int, list[tuple[float, float]]]:
    """``{layer: [(max |expert_i - expert_j|, ||expert_i - expert_j|| / ||expert_i||) for each pair i < j]}`` of
    ``checkpoint``, each expert's two projections taken as one vector."""
    from cptoolkit.models.checkpoint import read_weights

    weights, spread = read_weights(checkpoint), {}
    for layer in itertools.count():
        prefix = f"decoder.layers.{layer}.mlp.experts."
        if prefix + "fc1_weight" not in weights:
            return spread
        num_experts = weights[f"decoder.layers.{layer}.mlp.router.weight"].shape[0]
        experts = torch.cat([weights[prefix + "fc1_weight"].view(num_experts, -1),
                             weights[prefix + "fc2_weight"].view(num_experts, -1)], dim=1)
        spread[layer] = [(float((experts[i] - experts[j]).abs().max()),
                          float((experts[i] - experts[j]).norm() / experts[i].norm()))
                         for i, j in itertools.combinations(range(num_experts), 2)]


def _evaluate_rank(rank, world_size, checkpoint: Path) -> dict:
    """The mean token loss over the ``EVAL_STEPS`` batches and, for an MoE, each layer's (token, slot) share per
    expert over them (padding left out: the MoE layer's ``routing_record``)."""
    from cptoolkit.layers.core_attention import AttentionRuntime
    from cptoolkit.models.checkpoint import load_model_checkpoint
    from cptoolkit.models.gpt import gpt_forward
    from cptoolkit.models.shape import read_config
    from cptoolkit.models.families.registry import hf_shape
    from cptoolkit.models.tokenizer import ByteTokenizer
    from cptoolkit.moe.layer import moe_layers
    from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel
    from cptoolkit.training.data import (generate_corpus, get_batch_on_this_pcp_rank, pack_windows, sample_windows,
                                         tokenize_documents)

    shape = hf_shape(read_config(checkpoint), checkpoint)
    groups = initialize_model_parallel(1, 1, 1, shape.num_attention_heads, shape.num_kv_heads,
                                       num_experts=None if shape.moe is None else shape.moe.num_experts)
    try:
        runtime = AttentionRuntime(pcp_group=groups.pcp_group)
        model = load_model_checkpoint(checkpoint, groups.megatron_pg_collection(), runtime).eval()
        tokenizer = ByteTokenizer()
        documents = tokenize_documents(generate_corpus(seed=0), tokenizer)
        loss_sum, tokens, counts = 0.0, 0, 0
        for step in EVAL_STEPS:
            windows = sample_windows(documents, step, MICRO_BATCH, SEQ_LEN, seed=0)
            batch = get_batch_on_this_pcp_rank(pack_windows(windows), 0, 1, tokenizer.pad_token_id)
            token_loss = gpt_forward(model, batch.input_ids, batch.position_ids, runtime, labels=batch.labels,
                                     padding_mask=~batch.loss_mask).detach()  # grad on: the routing is recorded
            loss_sum += float(token_loss[batch.loss_mask].sum())
            tokens += int(batch.loss_mask.sum())
            counts = counts + torch.stack([layer.routing_record.counts for layer in moe_layers(model)]) \
                if shape.moe is not None else 0
    finally:
        destroy_model_parallel()
    shares = None if shape.moe is None else (counts / counts.sum(dim=1, keepdim=True)).tolist()
    return {"loss": loss_sum / tokens, "tokens": tokens, "shares": shares}


def evaluate(checkpoint: Path) -> dict:
    return run_ranks(1, _evaluate_rank, checkpoint, timeout_s=240)[0]


def test_the_experts_differ_after_training():
    spread = expert_spread(MOE)
    assert len(spread) == 2 and all(len(pairs) == 6 for pairs in spread.values()), spread
    # Upcycled, every pair is 0 in both; trained, every pair differs by more than 5% of an expert's norm.
    assert min(relative for pairs in spread.values() for _, relative in pairs) > 0.05, spread


def test_the_routing_spreads_the_tokens_over_every_expert():
    result = evaluate(MOE)
    for layer, shares in enumerate(result["shares"]):
        # Balanced: 1/4 each. Collapsed (every token on the same two experts): two shares of 0.
        assert min(shares) > 0.1 and max(shares) < 0.4, (layer, shares)


# ----------------------------------------------------------------------------- generate and serve

def test_generate_prints_the_same_text_at_one_rank_and_at_tp2_pcp2_dcp4_ep4(tmp_path):
    requests = [argument for prompt in PROMPTS for argument in ("--prompt", prompt)] + ["--max-tokens", str(MAX_TOKENS)]
    one_rank = generate([str(MOE), *requests], tmp_path)["requests"]
    output = tmp_path / "four.json"
    done = subprocess.run([*CLI, "generate", "--config", "configs/tiny_moe.yaml", *requests, "--output", str(output)],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    four = json.loads(output.read_text())
    assert "TP=2, PCP=2, DCP=4, EP=4" in four["layout"], four["layout"]
    four_ranks = four["requests"]
    assert [r["text"] for r in four_ranks] == [r["text"] for r in one_rank], (four_ranks, one_rank)
    assert all(len(r["token_ids"]) == MAX_TOKENS and r["error"] is None for r in one_rank), one_rank
    # Real text: the words of its corpus, not byte noise.
    assert all(r["text"].isascii() and " " in r["text"] for r in one_rank), one_rank


def test_serve_answers_a_completion_with_the_generated_text(tmp_path):
    args = [str(MOE), "--max-model-len", "128", "--max-num-seqs", "2"]
    (request,) = generate([*args, "--prompt", PROMPTS[0], "--max-tokens", str(MAX_TOKENS)], tmp_path)["requests"]
    with serving([*args, "--served-model-name", "tiny-moe"], tmp_path / "serve.log") as url:
        answer = httpx.post(f"{url}/v1/completions", timeout=JOB_TIMEOUT_S, json={
            "model": "tiny-moe", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0}).json()
    assert answer["choices"][0]["text"] == request["text"], (answer, request)


if __name__ == "__main__":
    for layer, pairs in expert_spread(MOE).items():
        print(f"layer {layer}, pairs (0,1) (0,2) (0,3) (1,2) (1,3) (2,3): max |expert_i - expert_j| "
              + " ".join(f"{value:.4f}" for value, _ in pairs) + "; ||expert_i - expert_j|| / ||expert_i|| "
              + " ".join(f"{relative:.3f}" for _, relative in pairs))
    for name, checkpoint in (("tiny-gqa", DENSE), ("tiny-moe", MOE)):
        result = evaluate(checkpoint)
        print(f"{name}: mean loss {result['loss']:.4f} nats/byte over {result['tokens']} tokens "
              f"(batches of steps {EVAL_STEPS.start}..{EVAL_STEPS.stop - 1})")
        for layer, shares in enumerate(result["shares"] or []):
            print(f"  layer {layer}: expert token shares " + ", ".join(f"{share:.3f}" for share in shares))
