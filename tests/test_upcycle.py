"""Sparse upcycling (``cptoolkit.models.upcycle``, ``cptoolkit upcycle``): every expert is a copy of the dense MLP and
the renormalised top-k weights sum to 1, so the upcycled model computes the dense model's logits — greedy tokens and
every sampled row's logits equal checkpoints/tiny-gqa's at one rank and at TP=2 x PCP=2 x DCP=4 with EP = 4 (every
rank one whole expert) and EP = 2 (experts TP-sliced); the tensors are exactly the dense ones, copied; the router is
seeded; and what has no exact upcycling, or no config.json, is refused in one line naming the rule."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from cptoolkit import cli
from cptoolkit.models.moe_dims import MoEDims
from cptoolkit.models.shape import GemmaBlock, GPTShape
from cptoolkit.models.upcycle import ROUTER_STD, upcycle, upcycled_shape
from tests.multiproc import run_ranks

REPO = Path(__file__).resolve().parents[1]
DENSE = REPO / "checkpoints" / "tiny-gqa"
EXPERTS, TOP_K = 4, 2
PROMPTS = ["the old man", "12 + 7 = 19. count: 3 4 5", "my sister likes"]
MAX_NEW = 8
# (tp, pcp, dcp, ep); ep None: one rank.
LAYOUTS = ((2, 2, 4, 4), (2, 2, 4, 2))
# Measured (float32, CPU), as a fraction of the row's largest logit: the upcycled model differs from the dense one
# by 2.6e-7 at one rank and 2.7e-7 at the same 4-rank layout (sum_i w_i·y rounds the weights' sum and the products),
# and from the dense one at one rank by 4.4e-7 (the dense model alone: 3.3e-7, the layouts' reduction order). One
# expert's down projection 1% off (the others exact copies) moves them by 3.2e-3.
RTOL = 1e-6

SHAPE = GPTShape(arch="llama", num_layers=2, hidden_size=16, num_attention_heads=4, num_kv_heads=2,
                 ffn_hidden_size=24, vocab_size=40, max_seq_len=32)


def _dense_state_dict(shape: GPTShape) -> dict[str, torch.Tensor]:
    from cptoolkit.models.checkpoint import full_tensor_shapes

    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(size, generator=generator) for name, size in full_tensor_shapes(shape).items()}


# ----------------------------------------------------------------------------- the state dict, pure

def test_every_expert_is_the_dense_mlp_and_the_rest_is_passed_through():
    from cptoolkit.models.checkpoint import full_tensor_shapes

    dense = _dense_state_dict(SHAPE)
    upcycled, shape = upcycle(dense, SHAPE, EXPERTS, TOP_K, seed=0)
    assert shape.moe == MoEDims(num_experts=EXPERTS, top_k=TOP_K, ffn_hidden_size=SHAPE.ffn_hidden_size,
                                moe_layers=(True, True), score="softmax", norm_topk_prob=True)
    # Exactly the tensors (and shapes) a checkpoint of the MoE shape holds, so it loads.
    assert {name: tuple(t.shape) for name, t in upcycled.items()} == full_tensor_shapes(shape)
    for layer in range(SHAPE.num_layers):
        mlp = f"decoder.layers.{layer}.mlp."
        fc1 = upcycled[mlp + "experts.fc1_weight"].view(EXPERTS, 2 * SHAPE.ffn_hidden_size, SHAPE.hidden_size)
        fc2 = upcycled[mlp + "experts.fc2_weight"].view(EXPERTS, SHAPE.ffn_hidden_size, SHAPE.hidden_size)
        for expert in range(EXPERTS):
            assert torch.equal(fc1[expert], dense[mlp + "linear_fc1.weight"]), (layer, expert)
            assert torch.equal(fc2[expert], dense[mlp + "linear_fc2.weight"].t()), (layer, expert)
        router = upcycled[mlp + "router.weight"]
        assert router.shape == (EXPERTS, SHAPE.hidden_size) and 0.5 * ROUTER_STD < router.std() < 2 * ROUTER_STD
    assert all(torch.equal(upcycled[name], tensor) for name, tensor in dense.items() if ".mlp." not in name)


def test_the_router_is_seeded_and_differs_per_layer_and_seed():
    dense = _dense_state_dict(SHAPE)
    routers = {seed: [upcycle(dense, SHAPE, EXPERTS, TOP_K, seed)[0][f"decoder.layers.{layer}.mlp.router.weight"]
                      for layer in range(SHAPE.num_layers)] for seed in (0, 0, 1)}
    again = upcycle(dense, SHAPE, EXPERTS, TOP_K, seed=0)[0]["decoder.layers.0.mlp.router.weight"]
    assert torch.equal(routers[0][0], again)
    assert not torch.equal(routers[0][0], routers[0][1]) and not torch.equal(routers[0][0], routers[1][0])


def test_a_bfloat16_model_upcycles_in_bfloat16():
    dense = {name: t.bfloat16() for name, t in _dense_state_dict(SHAPE).items()}
    upcycled, _ = upcycle(dense, SHAPE, EXPERTS, TOP_K, seed=0)
    assert {t.dtype for t in upcycled.values()} == {torch.bfloat16}


@pytest.mark.parametrize("shape,experts,top_k,match", [
    (SHAPE, 2, 3, r"top_k=3 exceeds num_experts=2; rule: each token takes top_k distinct experts"),
    (SHAPE, 0, 1, r"num_experts=0; rule: a positive integer"),
    (SHAPE, 4, 0, r"top_k=0; rule: a positive integer"),
    (upcycled_shape(SHAPE, 4, 2), 8, 2, r"already a mixture of experts \(num_experts=4, top_k=2\).*give the dense"),
    (GPTShape(arch="gpt2", num_layers=2, hidden_size=16, num_attention_heads=4, num_kv_heads=4, ffn_hidden_size=24,
              vocab_size=40, max_seq_len=32), 4, 2, r"GPT-2's GELU MLP with biases; rule: the experts are SwiGLU"),
    (GPTShape(arch="llama", num_layers=2, hidden_size=16, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=24,
              vocab_size=40, max_seq_len=32, gemma=GemmaBlock(query_pre_attn_scalar=4.0)), 4, 2,
     r"Gemma's GeGLU MLP; rule: the experts are SwiGLU"),
])
def test_what_has_no_exact_upcycling_is_refused(shape, experts, top_k, match):
    with pytest.raises(ValueError, match=match):
        upcycled_shape(shape, experts, top_k)


def test_a_state_dict_that_is_not_the_shapes_is_refused():
    dense = _dense_state_dict(SHAPE)
    with pytest.raises(ValueError, match=r"no 'decoder.layers.1.mlp.linear_fc2.weight'; rule: a dense model's full"):
        upcycle({k: v for k, v in dense.items() if k != "decoder.layers.1.mlp.linear_fc2.weight"}, SHAPE, 4, 2, 0)
    wide = {**dense, "decoder.layers.0.mlp.linear_fc1.weight": torch.zeros(64, SHAPE.hidden_size)}
    with pytest.raises(ValueError, match=r"linear_fc1.weight has shape \(64, 16\); rule: \(48, 16\)"):
        upcycle(wide, SHAPE, 4, 2, 0)


# ----------------------------------------------------------------------------- the command

def _upcycle_cli(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(["upcycle", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture(scope="module")
def upcycled_dir(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("upcycled") / "tiny-gqa-moe"
    assert cli.main(["upcycle", "--checkpoint", str(DENSE), "--experts", str(EXPERTS), "--top-k", str(TOP_K),
                     "--seed", "0", "--output", str(output)]) == 0
    return output


def test_the_command_writes_a_mixtral_checkpoint_with_the_tokenizer(upcycled_dir):
    from cptoolkit.models.checkpoint import read_weights

    config = json.loads((upcycled_dir / "config.json").read_text())
    assert (config["model_type"], config["num_local_experts"], config["num_experts_per_tok"]) == \
        ("mixtral", EXPERTS, TOP_K)
    assert (config["cptoolkit_format"], config["cptoolkit_tokenizer"], config["dtype"]) == (1, "byte", "float32")
    dense_config = json.loads((DENSE / "config.json").read_text())
    assert all(config[key] == dense_config[key] for key in ("hidden_size", "num_key_value_heads", "rope_parameters",
                                                             "intermediate_size", "vocab_size", "rms_norm_eps"))
    weights = read_weights(upcycled_dir)
    assert torch.equal(weights["decoder.layers.0.mlp.experts.fc1_weight"][-512:],
                       read_weights(DENSE)["decoder.layers.0.mlp.linear_fc1.weight"])


def test_a_hugging_face_checkpoint_upcycles_from_its_own_tensors_with_its_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    from cptoolkit.models.checkpoint import hf_to_full, read_weights
    from cptoolkit.models.families.registry import hf_shape
    from cptoolkit.models.shape import read_config
    from tests.hf_checkpoints import hf_model, save_checkpoint

    torch.manual_seed(0)
    dense_dir = Path(save_checkpoint(hf_model("llama"), tmp_path / "llama"))
    output = tmp_path / "llama-moe"
    assert cli.main(["upcycle", "--checkpoint", str(dense_dir), "--experts", "2", "--top-k", "1", "--seed", "3",
                     "--output", str(output)]) == 0
    dense_shape = hf_shape(read_config(dense_dir), dense_dir)
    want, want_shape = upcycle(hf_to_full(read_weights(dense_dir), dense_shape), dense_shape, 2, 1, seed=3)
    got = read_weights(output)
    assert got.keys() == want.keys() and all(torch.equal(got[name], want[name]) for name in want)
    assert hf_shape(read_config(output), output) == want_shape and want_shape.rope_theta == 500.0
    assert (output / "tokenizer.json").is_file() and "cptoolkit_tokenizer" not in read_config(output)


def test_help_lists_every_flag_with_its_help(capsys):
    from tests.test_cli import _undocumented

    with pytest.raises(SystemExit) as exited:
        cli.main(["upcycle", "--help"])
    text = capsys.readouterr().out
    assert exited.value.code == 0 and not _undocumented(text), text
    assert all(flag in text for flag in ("--checkpoint", "--experts", "--top-k", "--seed", "--output")), text


def test_the_command_refuses_in_one_line(capsys, upcycled_dir, tmp_path):
    common = ["--output", str(tmp_path / "out")]
    code, out = _upcycle_cli(capsys, "--checkpoint", str(upcycled_dir), "--experts", "4", "--top-k", "2", *common)
    assert code == 2 and "already a mixture of experts (num_experts=4, top_k=2)" in out, out
    code, out = _upcycle_cli(capsys, "--checkpoint", str(DENSE), "--experts", "2", "--top-k", "3", *common)
    assert code == 2 and out.startswith(f"error: cptoolkit upcycle --checkpoint {DENSE} --experts 2 --top-k 3: "
                                        "top_k=3 exceeds num_experts=2"), out
    code, out = _upcycle_cli(capsys, "--checkpoint", str(DENSE), "--experts", "4", "--top-k", "2",
                             "--output", str(upcycled_dir))
    assert code == 2 and "exists and is not an empty directory" in out, out
    assert not (tmp_path / "out").exists() and len(out.strip().splitlines()) == 1


def test_a_model_no_config_json_can_state_upcycled_is_refused_before_reading_weights(capsys, tmp_path):
    """Qwen2 (q/k/v biases) upcycles to Qwen2-MoE, whose config.json always has a gated shared expert."""
    qwen2 = tmp_path / "qwen2"
    qwen2.mkdir()
    (qwen2 / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 2, "hidden_size": 16,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 24, "vocab_size": 40,
        "max_position_embeddings": 32, "rms_norm_eps": 1e-6, "hidden_act": "silu"}))
    code, out = _upcycle_cli(capsys, "--checkpoint", str(qwen2), "--experts", "4", "--top-k", "2",
                             "--output", str(tmp_path / "out"))
    assert code == 2 and "has no qwen2_moe config.json; rule: qwen2_moe routes with shared_expert_gate=True" in out, \
        out


# ----------------------------------------------------------------------------- the logits, 1 and 4 ranks

def _generate_rank(rank, world_size, checkpoints):
    from cptoolkit.config import config_from_dict, model_moe
    from cptoolkit.inference.builder import build_engine
    from cptoolkit.inference.sampling import SamplingParams
    from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel

    results = {}
    for name, directory in checkpoints.items():
        for tp, pcp, dcp, ep in ((1, 1, 1, None),) if world_size == 1 else LAYOUTS:
            cfg = config_from_dict({"parallel": dict(tp=tp, pcp=pcp, dcp=dcp, ep=ep),
                                    "model": {"checkpoint": str(directory)}, "runtime": {"device": "cpu"},
                                    "inference": {"prompts": ["unused"], "batch_size": 4}}, source="<test>")
            moe = model_moe(cfg.model)
            groups = initialize_model_parallel(tp=tp, pcp=pcp, dcp=dcp, num_heads=cfg.model.num_attention_heads,
                                               num_kv_heads=cfg.model.num_kv_heads, ep=ep,
                                               num_experts=None if moe is None else moe.num_experts)
            try:
                engine = build_engine(cfg, groups, torch.device("cpu"))
                rows, sample = defaultdict(list), engine.sampler.sample

                def recording(logits, requests, rows=rows, sample=sample):
                    for row, request in zip(logits, requests):
                        rows[request.index].append(row.clone())
                    return sample(logits, requests)

                engine.sampler.sample = recording
                generated = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW))
            finally:
                destroy_model_parallel()
            results[name, (tp, pcp, dcp, ep)] = {"tokens": [r.token_ids for r in generated],
                                                 "logits": [torch.stack(rows[i]) for i in range(len(PROMPTS))]}
    return results


def _max_relative_diff(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((g.double() - w.double()).abs().max() / w.abs().max()) for g, w in zip(got, want))


@pytest.fixture(scope="module")
def one_rank(upcycled_dir):
    return run_ranks(1, _generate_rank, {"dense": DENSE, "moe": upcycled_dir}, timeout_s=240)[0]


def test_the_upcycled_model_gives_the_dense_logits_at_one_rank(one_rank):
    dense, moe = one_rank["dense", (1, 1, 1, None)], one_rank["moe", (1, 1, 1, None)]
    assert moe["tokens"] == dense["tokens"]
    diff = _max_relative_diff(moe["logits"], dense["logits"])
    assert diff <= RTOL, f"upcycled logits differ from the dense model's by {diff:.3g} of the largest"


def test_the_upcycled_model_gives_the_dense_logits_at_tp2_pcp2_dcp4_ep4_and_ep2(one_rank, upcycled_dir):
    reference = one_rank["dense", (1, 1, 1, None)]
    per_rank = run_ranks(4, _generate_rank, {"dense": DENSE, "moe": upcycled_dir}, timeout_s=480)
    for rank, results in enumerate(per_rank):
        for layout in LAYOUTS:
            dense, moe = results["dense", layout], results["moe", layout]
            label = f"rank {rank}, (tp, pcp, dcp, ep) = {layout}"
            assert moe["tokens"] == dense["tokens"] == reference["tokens"], label
            same_layout = _max_relative_diff(moe["logits"], dense["logits"])
            one_rank_diff = _max_relative_diff(moe["logits"], reference["logits"])
            assert same_layout <= RTOL and one_rank_diff <= RTOL, \
                f"{label}: upcycled logits differ by {same_layout:.3g} (dense, same layout), {one_rank_diff:.3g} " \
                "(dense, one rank) of the largest"
