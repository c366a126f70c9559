"""lm-evaluation-harness against the server: ``lm-eval run --model local-completions`` (base_url at a
launch/serve.py job) scores a loglikelihood task (multiple choice), a perplexity task
(loglikelihood_rolling) and a generate_until task, all on data made here (no hub), and every score and
every per-sample answer equals what lm-eval's own ``--model hf`` (transformers) gives on the same
checkpoint. The server runs at TP=1 x PCP=2 x DCP=2 on two ranks, so each prompt is scored over PCP.

The checkpoint is a random Llama from ``transformers`` with a byte-level BPE tokenizer trained on the
task data; its weights are scaled up so its distributions are peaked and the choices' loglikelihoods
far apart, far beyond float32 rounding between two implementations.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from tests.test_server import Server

pytest.importorskip("lm_eval")

REPO = Path(__file__).resolve().parents[1]
LM_EVAL = [sys.executable, "-m", "lm_eval", "run"]
MODEL_NAME = "tiny-llama-bpe"
TASKS = ("cpt_choice", "cpt_perplexity", "cpt_answer")
LOGLIKELIHOOD_RTOL = 1e-4
SUBJECTS = ["the ring", "the cache", "a rank", "the prompt", "each shard", "the decoder", "the kernel", "a query"]
VERBS = ["holds", "sends", "merges", "splits", "reads", "writes"]
OBJECTS = ["the keys", "two chunks", "its values", "the tokens", "one block", "the logits"]


def _documents() -> tuple[list[dict], list[dict], list[dict]]:
    """(multiple-choice docs, perplexity docs, question-answer docs), deterministic."""
    choice_docs, text_docs, answer_docs = [], [], []
    for i, subject in enumerate(SUBJECTS):
        verb, objects = VERBS[i % len(VERBS)], OBJECTS[i % len(OBJECTS):] + OBJECTS[:i % len(OBJECTS)]
        choice_docs.append({"question": f"What does {subject} do?", "choices": [f"{subject} {verb} {o}" for o in
                                                                              objects[:4]], "answer": i % 4})
        text_docs.append({"text": f"{subject} {verb} {objects[0]} and then {objects[1]}; " * (1 + i % 3)})
        answer_docs.append({"question": f"Which one {verb} {objects[0]}?", "answer": f" {subject}"})
    return choice_docs, text_docs, answer_docs


def _task_files(directory: Path) -> None:
    """The three tasks' data (JSON lines) and YAML configs in ``directory`` (lm-eval's --include_path)."""
    choice_docs, text_docs, answer_docs = _documents()
    for name, docs in (("choice", choice_docs), ("perplexity", text_docs), ("answer", answer_docs)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    common = lambda name: {"dataset_path": "json", "test_split": "test",  # noqa: E731
                           "dataset_kwargs": {"data_files": {"test": str(directory / f"{name}.jsonl")}}}
    tasks = {
        "cpt_choice": {**common("choice"), "output_type": "multiple_choice",
                       "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "{{choices}}",
                       "doc_to_target": "answer", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]},
        "cpt_perplexity": {**common("perplexity"), "output_type": "loglikelihood_rolling", "doc_to_text": "",
                           "doc_to_target": "{{text}}",
                           "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                                           {"metric": "bits_per_byte"}]},
        "cpt_answer": {**common("answer"), "output_type": "generate_until", "doc_to_text": "Q: {{question}}\nA:",
                       "doc_to_target": "{{answer}}",
                       "generation_kwargs": {"until": ["\n", "?"], "max_gen_toks": 8, "do_sample": False},
                       "metric_list": [{"metric": "exact_match"}]},
    }
    for task, config in tasks.items():
        (directory / f"{task}.yaml").write_text(yaml.safe_dump({"task": task, **config}))


def _checkpoint(directory: Path) -> None:
    """A random Llama (2 layers, 4 query heads, 2 KV heads) and a byte-level BPE tokenizer trained on the
    task documents, saved as a Hugging Face checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    choice_docs, text_docs, answer_docs = _documents()
    corpus = [doc["text"] for doc in text_docs] + [" ".join(doc["choices"]) for doc in choice_docs] + [
        f"Question: {d['question']}\nAnswer: Q: A:{d['answer']}" for d in answer_docs]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                                      bos_token_id=tokenizer.eos_token_id, initializer_range=0.25)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)


def _env(tmp: Path) -> dict:
    """Offline, and every cache inside the test's directory."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HOME": str(tmp / "hf_home"), "HF_DATASETS_CACHE": str(tmp / "datasets"), "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1"}


def _lm_eval(tmp: Path, name: str, model: str, model_args: str) -> dict:
    """One ``lm-eval run`` of every task: ``{"results": {task: metrics}, "samples": {task: [sample]}}``."""
    output = tmp / name
    command = [*LM_EVAL, "--model", model, "--model_args", model_args, "--tasks", ",".join(TASKS),
               "--include_path", str(tmp / "tasks"), "--batch_size", "4", "--output_path", str(output),
               "--log_samples", "--seed", "1234", "--device", "cpu"]
    run = subprocess.run(command, cwd=tmp, env=_env(tmp), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{' '.join(command)}\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    results = json.loads(next(output.rglob("results_*.json")).read_text())["results"]
    samples = {task: [json.loads(line) for line in next(output.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
               for task in TASKS}
    return {"results": results, "samples": samples}


def _server_config(tmp: Path, checkpoint: Path) -> Path:
    raw = {"parallel": {"tp": 1, "pcp": 2, "dcp": 2},
           "model": {"checkpoint": str(checkpoint)},
           "inference": {"batch_size": 8, "max_seq_len": 512, "prefill_chunk_size": 64},
           "runtime": {"device": "cpu", "dtype": "float32", "collective_timeout_s": 120}}
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm_eval")
    checkpoint = tmp / MODEL_NAME
    _checkpoint(checkpoint)
    (tmp / "tasks").mkdir()
    _task_files(tmp / "tasks")
    transformers_run = _lm_eval(tmp, "hf", "hf", f"pretrained={checkpoint},dtype=float32")
    server = Server.torchrun(2, _server_config(tmp, checkpoint), tmp / "server.log")
    try:
        served = _lm_eval(tmp, "served", "local-completions",
                          f"model={MODEL_NAME},base_url={server.url}/v1/completions,tokenizer={checkpoint},"
                          "tokenizer_backend=huggingface,num_concurrent=2,max_retries=1,max_length=512")
    finally:
        server.stop()
    return transformers_run, served


def _close(got: float, want: float) -> bool:
    return math.isclose(got, want, rel_tol=LOGLIKELIHOOD_RTOL, abs_tol=LOGLIKELIHOOD_RTOL)


def test_multiple_choice_scores_and_loglikelihoods_equal_transformers(evaluations):
    transformers_run, served = evaluations
    for metric in ("acc,none", "acc_norm,none"):
        assert served["results"]["cpt_choice"][metric] == transformers_run["results"]["cpt_choice"][metric], metric
    for got, want in zip(served["samples"]["cpt_choice"], transformers_run["samples"]["cpt_choice"], strict=True):
        assert got["doc_id"] == want["doc_id"]
        got_scores, want_scores = [r[0] for r in got["filtered_resps"]], [r[0] for r in want["filtered_resps"]]
        assert all(map(_close, map(float, got_scores), map(float, want_scores))), (got_scores, want_scores)
        assert [r[1] for r in got["filtered_resps"]] == [r[1] for r in want["filtered_resps"]]  # is_greedy
    scores = [float(r[0]) for sample in transformers_run["samples"]["cpt_choice"] for r in sample["filtered_resps"]]
    assert max(scores) - min(scores) > 1.0, scores  # the choices are told apart, not tied


def test_perplexity_equals_transformers(evaluations):
    transformers_run, served = evaluations
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        got, want = served["results"]["cpt_perplexity"][metric], transformers_run["results"]["cpt_perplexity"][metric]
        assert _close(got, want), (metric, got, want)


def test_generate_until_answers_equal_transformers(evaluations):
    transformers_run, served = evaluations
    got = [sample["filtered_resps"] for sample in served["samples"]["cpt_answer"]]
    want = [sample["filtered_resps"] for sample in transformers_run["samples"]["cpt_answer"]]
    assert got == want
    assert any(answer[0] for answer in want), want  # something was generated
    assert served["results"]["cpt_answer"]["exact_match,none"] == \
        transformers_run["results"]["cpt_answer"]["exact_match,none"]
