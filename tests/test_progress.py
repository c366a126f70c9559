"""Progress bars for long work: drawn on global rank 0 only, and only when stderr is a terminal.

The policy alone (``cptoolkit.progress``) runs in the test process. The real work runs on both ranks of one
2-rank gloo job (TP=1, PCP=2, DCP=2), each rank twice, its ``sys.stderr`` replaced by a stream that says it
is a terminal or that it is not: load ``checkpoints/tiny-gqa`` and generate for a prompt of several prefill
chunks and a short one; train two steps. Rank 0 on a terminal shows a bar per job with its total (the
model's tensors, the long prompt's tokens, the steps, the loss in the postfix) and none for the short
prompt; rank 0 off a terminal, and rank 1 either way, write nothing at all on stderr.
"""
from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path

import pytest
import torch

from cptoolkit.config import config_from_dict
from cptoolkit.distributed import setup_logging
from cptoolkit.inference.builder import build_engine
from cptoolkit.inference.sampling import SamplingParams
from cptoolkit.models.tokenizer import ByteTokenizer
from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel
from cptoolkit.progress import DISABLE_ENV, progress
from cptoolkit.training.data import generate_corpus, tokenize_documents
from cptoolkit.training.trainer import build_trainer
from tests.multiproc import run_ranks

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "checkpoints" / "tiny-gqa"
CHUNK = 8
LONG_PROMPT = "the old man follows a wooden boat"  # 33 byte tokens: 5 chunks of 8
SHORT_PROMPT = "count: 3"                          # one chunk: no bar
TRAIN_STEPS = 2


class _Stderr(io.StringIO):
    """A captured stderr that is, or is not, a terminal (all tqdm asks of it)."""

    def __init__(self, terminal: bool):
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


def _captured(terminal: bool, work) -> tuple[str, object]:
    """What ``work()`` writes on ``sys.stderr`` while stderr is a ``_Stderr(terminal)``, and what it returns."""
    saved, sys.stderr = sys.stderr, _Stderr(terminal)
    try:
        value = work()
        return sys.stderr.getvalue(), value
    finally:
        sys.stderr = saved


# ----------------------------------------------------------------------------- the policy alone

@pytest.mark.parametrize("terminal, rank, env, shown", [(True, "0", None, True), (False, "0", None, False),
                                                        (True, "1", None, False), (True, "0", "0", False)],
                         ids=["rank0_terminal", "not_a_terminal", "rank1", "disabled_by_env"])
def test_a_bar_is_drawn_on_rank_0_on_a_terminal_only(monkeypatch, terminal, rank, env, shown):
    monkeypatch.setenv("RANK", rank)
    if env is None:
        monkeypatch.delenv(DISABLE_ENV, raising=False)
    else:
        monkeypatch.setenv(DISABLE_ENV, env)

    def work():
        with progress(3, "work", "item") as bar:
            bar.update(3)
        return list(progress(["a", "b"], "items", "item"))

    text, items = _captured(terminal, work)
    assert items == ["a", "b"], "a disabled bar still yields its iterable's items"
    assert ("work: 100%" in text and "3/3" in text and "2/2" in text) == shown, repr(text)
    if not shown:
        assert text == ""


# ----------------------------------------------------------------------------- real work on 2 ranks

def _load_and_generate() -> tuple[int, list, bool]:
    """Load the checkpoint and generate for the two prompts, then cancel a long prompt after its first chunk;
    returns (the model's tensors, the token ids, whether the cancelled prompt's bar was closed)."""
    cfg = config_from_dict({
        "parallel": dict(tp=1, pcp=2, dcp=2), "model": {"checkpoint": str(CHECKPOINT)},
        "runtime": {"device": "cpu"},
        "inference": {"prompts": ["x"], "batch_size": 2, "kv_block_size": 4, "max_seq_len": 64,
                      "prefill_chunk_size": CHUNK}}, source="<test>")
    groups = initialize_model_parallel(tp=1, pcp=2, dcp=2, num_heads=8, num_kv_heads=2)
    try:
        engine = build_engine(cfg, groups, torch.device("cpu"))
        greedy = SamplingParams(temperature=0.0, max_new_tokens=2)
        results = engine.generate([LONG_PROMPT, SHORT_PROMPT], greedy)
        cancelled = engine.add_request(LONG_PROMPT, greedy, index=9)
        engine.step()
        engine.cancel(cancelled)
        engine.step()
        return len(list(engine.model.parameters())), [r.token_ids for r in results], not engine.scheduler.prefill_bars
    finally:
        destroy_model_parallel()


def _train() -> list[float]:
    cfg = config_from_dict({
        "parallel": dict(tp=1, pcp=2, dcp=2),
        "model": dict(num_layers=1, hidden_size=32, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                      vocab_size=260, max_seq_len=32, seed=7),
        "runtime": {"device": "cpu"},
        "train": dict(steps=TRAIN_STEPS, seq_len=16, micro_batch_size=2, warmup_steps=1, seed=3)}, source="<test>")
    groups = initialize_model_parallel(tp=1, pcp=2, dcp=2, num_heads=4, num_kv_heads=2)
    try:
        documents = tokenize_documents(generate_corpus(20, seed=0), ByteTokenizer())
        trainer = build_trainer(cfg, groups, documents, ByteTokenizer.eos_token_id, torch.device("cpu"))
        return [metrics.loss for metrics in trainer.run()]
    finally:
        destroy_model_parallel()


def _long_work_rank(rank, world_size):
    """{(terminal, job): what the job wrote on stderr}, plus the jobs' results, on this rank. Logging is set up
    as a launcher does (INFO lines on stdout from rank 0; third-party warnings silenced)."""
    os.environ.pop(DISABLE_ENV, None)
    setup_logging(rank)
    texts, results = {}, {}
    for terminal in (True, False):
        for job, work in (("generate", _load_and_generate), ("train", _train)):
            texts[terminal, job], results[terminal, job] = _captured(terminal, work)
    return texts, results


@pytest.fixture(scope="module")
def long_work():
    return run_ranks(2, _long_work_rank, timeout_s=120)


def _final_frame(text: str, desc: str) -> str:
    """The last frame drawn of the bar labelled ``desc`` (tqdm redraws a line after a carriage return)."""
    frames = [frame for frame in re.split(r"[\r\n]", text) if frame.startswith(desc + ":")]
    assert frames, f"no bar {desc!r} on stderr: {text!r}"
    return frames[-1]


def test_rank_0_on_a_terminal_shows_the_load_prefill_and_training_bars_with_their_totals(long_work):
    texts, results = long_work[0]
    num_tensors, _, _ = results[True, "generate"]
    load = _final_frame(texts[True, "generate"], "loading tiny-gqa")
    assert "100%" in load and f"| {num_tensors}/{num_tensors} " in load, load
    prefill = _final_frame(texts[True, "generate"], "prefill request 0")
    assert f"| {len(LONG_PROMPT)}/{len(LONG_PROMPT)} " in prefill, prefill
    assert "prefill request 1" not in texts[True, "generate"], "the one-chunk prompt gets no bar"
    cancelled = _final_frame(texts[True, "generate"], "prefill request 9")
    assert f"| {CHUNK}/{len(LONG_PROMPT)} " in cancelled, cancelled
    assert results[True, "generate"][2], "a prompt cancelled while prefilling has its bar closed at once"
    train = _final_frame(texts[True, "train"], "training")
    losses = results[True, "train"]
    assert f"| {TRAIN_STEPS}/{TRAIN_STEPS} " in train and f"loss={losses[-1]:.4f}" in train, train
    assert "loading" not in texts[True, "train"], "the built-in model is initialised, not loaded: no bar"


def test_off_a_terminal_and_on_rank_1_nothing_is_written_on_stderr(long_work):
    for rank, (texts, results) in enumerate(long_work):
        for (terminal, job), text in texts.items():
            if rank == 1 or not terminal:
                assert text == "", f"rank {rank}, {job}, stderr a terminal: {terminal}: {text!r}"
        assert results[True, "generate"] == results[False, "generate"], "the bars change no token"
        assert results[True, "train"] == results[False, "train"], "the bars change no loss"
