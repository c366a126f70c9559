"""Training with prefill context parallelism equals single-rank training.

One single-rank reference run and one 4-rank run (several layouts in turn, groups rebuilt between them)
train the same tiny models on the same data with the same seeds. Per-step losses must agree to 2e-7
relative (float32 rounding: its epsilon is 1.19e-7) for 20 steps, and the clipped gradients after the
first step parameter by parameter (TP shards gathered to full tensors). A checkpoint saved at
TP=2 x PCP=2 must give the same loss at TP=1 x PCP=4.
Both prefill comms (ring and all-gather) are covered. A torchrun smoke test runs launch/train.py on 2 ranks
(TP=1 x PCP=2) and launch/infer.py from its checkpoint at TP=2; a bad config exits before any process group.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.multiproc import free_port, run_ranks

REPO = Path(__file__).resolve().parents[1]
STEPS = 20
GLOBAL_BATCH = 4
EVAL_STEP = 1000  # a batch no training step saw
LLAMA = dict(arch="llama", num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2,
             ffn_hidden_size=128, vocab_size=260, max_seq_len=64, seed=7)
GPT2 = dict(LLAMA, arch="gpt2", num_kv_heads=4, tie_embeddings=True)
# Measured (CPU, gloo, float32): losses 1.35e-7 relative at worst over the 4 layouts and 20 steps, the
# step-1 gradient norm 1.8e-8, gradients 7.5e-7 of the parameter's largest entry, the reloaded
# checkpoint's loss 9.9e-8. Float32's epsilon is 1.19e-7: the losses differ by about one rounding.
LOSS_RTOL = 2e-7
GRAD_NORM_RTOL = 1e-7
GRAD_RTOL = 2e-6  # of the parameter's largest reference gradient entry
CHECKPOINT_RTOL = 2e-7


def _config(model: dict, tp: int = 1, pcp: int = 1, dp: int = 1, prefill_comm: str = "p2p"):
    from cptoolkit.config import config_from_dict

    return config_from_dict({
        "parallel": dict(tp=tp, pcp=pcp, dcp=pcp, dp=dp, prefill_comm=prefill_comm),
        "model": model, "runtime": {"device": "cpu"},
        "train": dict(steps=STEPS, seq_len=32, micro_batch_size=GLOBAL_BATCH // dp, lr=3e-3, min_lr=3e-4,
                      warmup_steps=2, grad_clip=1.0, seed=3)}, source="<test>")


def _documents() -> list[torch.Tensor]:
    from cptoolkit.models.tokenizer import ByteTokenizer
    from cptoolkit.training.data import generate_corpus, tokenize_documents

    return tokenize_documents(generate_corpus(300, seed=0), ByteTokenizer())


def _full_gradients(model) -> dict[str, np.ndarray]:
    """Every parameter's full (TP-gathered) gradient: ``gather_full_state_dict`` of the model while its
    parameters temporarily hold their gradients (collective over the TP group)."""
    from cptoolkit.models.tp_sharding import gather_full_state_dict

    params = list(model.parameters())
    weights = [p.data for p in params]
    for param in params:
        param.data = param.grad
    try:
        return {name: t.numpy().copy() for name, t in gather_full_state_dict(model).items()}
    finally:
        for param, weight in zip(params, weights):
            param.data = weight


def _train(cfg, documents, save_dir: str | None = None) -> dict:
    """Train ``cfg`` on the current world; returns losses, grad norms, per-step local token counts, step-1
    full gradients, and (with ``save_dir``) the trained model's loss on the EVAL_STEP batch after saving it."""
    from cptoolkit.models.checkpoint import save_checkpoint
    from cptoolkit.models.tokenizer import ByteTokenizer
    from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel
    from cptoolkit.training.trainer import build_trainer, compute_gradients

    p, m = cfg.parallel, cfg.model
    groups = initialize_model_parallel(tp=p.tp, pcp=p.pcp, dcp=p.dcp, dp=p.dp, num_heads=m.num_attention_heads,
                                       num_kv_heads=m.num_kv_heads)
    try:
        trainer = build_trainer(cfg, groups, documents, ByteTokenizer.eos_token_id, torch.device("cpu"))
        history = [trainer.step()]
        result = {"grads": _full_gradients(trainer.model),
                  "local_tokens": [trainer.batch(step).num_loss_tokens for step in range(STEPS)]}
        history += [trainer.step() for _ in range(STEPS - 1)]
        result.update(losses=[h.loss for h in history], grad_norms=[h.grad_norm for h in history],
                      comm_calls=dict(trainer.runtime.stats.calls))
        if save_dir is not None:
            save_checkpoint(trainer.model, save_dir, ByteTokenizer())
            result["eval_loss"] = compute_gradients(trainer.model, trainer.runtime, trainer.batch(EVAL_STEP),
                                                    groups).loss
        return result
    finally:
        destroy_model_parallel()


def _checkpoint_eval_loss(cfg, documents) -> float:
    """Loss on the EVAL_STEP batch of the model that ``build_trainer`` loads from ``cfg.model.checkpoint``."""
    from cptoolkit.models.tokenizer import ByteTokenizer
    from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel
    from cptoolkit.training.trainer import build_trainer, compute_gradients

    p, m = cfg.parallel, cfg.model
    groups = initialize_model_parallel(tp=p.tp, pcp=p.pcp, dcp=p.dcp, dp=p.dp, num_heads=m.num_attention_heads,
                                       num_kv_heads=m.num_kv_heads)
    try:
        trainer = build_trainer(cfg, groups, documents, ByteTokenizer.eos_token_id, torch.device("cpu"))
        return compute_gradients(trainer.model, trainer.runtime, trainer.batch(EVAL_STEP), groups).loss
    finally:
        destroy_model_parallel()


def _reference_runs(rank, world_size):
    documents = _documents()
    return {"llama": _train(_config(LLAMA), documents), "gpt2": _train(_config(GPT2), documents)}


def _parallel_runs(rank, world_size, checkpoint_dir: str):
    from cptoolkit.config import config_from_dict

    documents = _documents()
    results = {
        "llama tp2 pcp2": _train(_config(LLAMA, tp=2, pcp=2), documents, save_dir=checkpoint_dir),
        "llama tp1 pcp4": _train(_config(LLAMA, pcp=4), documents),
        "llama dp2 pcp2 all_gather": _train(_config(LLAMA, pcp=2, dp=2, prefill_comm="all_gather"), documents),
        "gpt2 tp2 pcp2": _train(_config(GPT2, tp=2, pcp=2), documents),
    }
    reload_cfg = config_from_dict({"parallel": dict(tp=1, pcp=4, dcp=4), "model": {"checkpoint": checkpoint_dir},
                                   "runtime": {"device": "cpu"}, "train": dict(steps=1, warmup_steps=0, seq_len=32, micro_batch_size=4,
                                                                              seed=3)}, source="<test>")
    results["checkpoint at tp1 pcp4"] = _checkpoint_eval_loss(reload_cfg, documents)
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    checkpoint_dir = str(tmp_path_factory.mktemp("ckpt"))
    reference = run_ranks(1, _reference_runs, timeout_s=180)[0]
    parallel = run_ranks(4, _parallel_runs, checkpoint_dir, timeout_s=300)
    return reference, parallel


def _assert_close_rel(got: list[float], want: list[float], rtol: float, what: str) -> None:
    rel = [abs(g - w) / abs(w) for g, w in zip(got, want)]
    worst = int(np.argmax(rel))
    assert len(got) == len(want) and max(rel) <= rtol, (
        f"{what}: max relative difference {max(rel):.2e} at step {worst + 1} (got {got[worst]:.6f}, "
        f"want {want[worst]:.6f}), mean {np.mean(rel):.2e}")


@pytest.mark.parametrize("layout", ["llama tp2 pcp2", "llama tp1 pcp4", "llama dp2 pcp2 all_gather",
                                    "gpt2 tp2 pcp2"])
def test_cp_training_matches_single_rank_training(runs, layout):
    reference, parallel = runs
    want = reference[layout.split()[0]]
    for rank, result in enumerate(parallel):
        run = result[layout]
        _assert_close_rel(run["losses"], want["losses"], LOSS_RTOL, f"{layout} rank {rank} losses")
        _assert_close_rel(run["grad_norms"][:1], want["grad_norms"][:1], GRAD_NORM_RTOL,
                          f"{layout} rank {rank} grad norm")
        for name, ref_grad in want["grads"].items():
            diff = np.abs(run["grads"][name] - ref_grad)
            assert diff.max() <= GRAD_RTOL * np.abs(ref_grad).max(), (
                f"{layout} rank {rank} step-1 gradient of {name}: max abs diff {diff.max():.3e}, mean "
                f"{diff.mean():.3e}, reference max {np.abs(ref_grad).max():.3e}")
        # Attention (ring or all-gather) issues no all-reduce: these are the trainer's 3 per step.
        assert run["comm_calls"]["all_reduce"] == 3 * STEPS, f"{layout} rank {rank}: {run['comm_calls']}"
    assert want["losses"][-1] < 0.8 * want["losses"][0], f"training did not learn: {want['losses']}"
    assert want["grad_norms"][0] > 1.0, "step 1 must exercise gradient clipping (grad_clip = 1.0)"


def test_ranks_hold_different_token_counts(runs):
    """Padding of variable-length sequences gives ranks unequal real-token counts, so the loss parity above
    holds only with the global-token normalization (a mean of per-rank means would differ)."""
    _, parallel = runs
    for layout in ("llama tp1 pcp4", "llama dp2 pcp2 all_gather"):
        per_step = list(zip(*(result[layout]["local_tokens"] for result in parallel)))
        assert any(len(set(counts)) > 1 for counts in per_step), f"{layout}: equal rank token counts {per_step}"


def test_checkpoint_saved_at_tp2_pcp2_loads_at_tp1_pcp4(runs):
    _, parallel = runs
    for rank, result in enumerate(parallel):
        saved, reloaded = result["llama tp2 pcp2"]["eval_loss"], result["checkpoint at tp1 pcp4"]
        assert abs(reloaded - saved) <= CHECKPOINT_RTOL * saved, (
            f"rank {rank}: eval loss {reloaded} after reload, {saved} before "
            f"(relative {abs(reloaded - saved) / saved:.2e})")


def _write_config(path: Path, parallel: dict, train: dict) -> Path:
    path.write_text(json.dumps({"parallel": parallel, "model": LLAMA,
                                "runtime": {"device": "cpu"}, "train": train}))
    return path


def _torchrun(script: str, config: Path, output: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(free_port()), script, "--config", str(config), "--output", str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=180)


def test_torchrun_smoke_two_ranks_then_infer_from_the_checkpoint_at_another_layout(tmp_path):
    config = _write_config(tmp_path / "train.yaml", dict(tp=1, pcp=2, dcp=2),
                           dict(steps=3, seq_len=32, micro_batch_size=2, warmup_steps=1, save_dir="ckpt"))
    proc = _torchrun("launch/train.py", config, tmp_path / "losses.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[rank 0] step 3/3 | loss" in proc.stdout and "tokens/s" in proc.stdout, proc.stdout[-2000:]
    steps = json.loads((tmp_path / "losses.json").read_text())["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    for s in steps:
        assert np.isfinite([s["loss"], s["lr"], s["grad_norm"], s["tokens_per_s"]]).all() and s["num_tokens"] > 0

    (tmp_path / "infer.yaml").write_text(json.dumps({
        "parallel": dict(tp=2, pcp=1, dcp=1), "model": {"checkpoint": "ckpt"}, "runtime": {"device": "cpu"},
        "inference": {"prompts": ["12 plus 30 is"], "max_new_tokens": 4}}))
    proc = _torchrun("launch/infer.py", tmp_path / "infer.yaml", tmp_path / "infer.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (request,) = json.loads((tmp_path / "infer.json").read_text())["requests"]
    assert request["error"] is None and request["token_ids"], request


def test_bad_train_config_exits_before_any_process_group(tmp_path):
    config = _write_config(tmp_path / "bad.yaml", dict(tp=4, pcp=1, dcp=1), dict(seq_len=32))
    proc = subprocess.run([sys.executable, "launch/train.py", "--config", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "WORLD_SIZE": "4", "RANK": "0"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "model.num_kv_heads = 2: must be a multiple of parallel.tp (4) for training" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
