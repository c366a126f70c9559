"""Tiny checkpoints of every supported Hugging Face family, made and saved by transformers itself (shared by
tests/test_hf_families.py, which checks each against transformers' tokens and logits, and
tests/test_family_entrypoints.py, which runs each through ``cptoolkit generate`` and ``cptoolkit serve``), and of
the mixture-of-experts families (``MOE_FAMILIES``: tests/test_moe_families.py checks their configs and tensors).

Each family is a tiny random model with ``initializer_range=0.2`` so that attention, and so every position,
matters (logits of order 5, far from uniform), and with its norm weights and biases (Qwen2's q/k/v biases, Qwen3's
q/k norms) moved off their 1 and 0. The tokenizer is word-level over ``w1 .. w{VOCAB-1}``.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 64
# No eos in the models' configs, and the tokenizer's past the models' vocabulary: every request runs all its
# max_new_tokens, in transformers and in cptoolkit (stopping on end-of-turn ids: tests/test_chat.py).
EOS = VOCAB
LLAMA_SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                   initializer_range=0.2, bos_token_id=1, eos_token_id=None, pad_token_id=0)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 1000.0}
# family -> (config class, model class, config arguments)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    "llama_linear": ("LlamaConfig", "LlamaForCausalLM",
                     dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0})),
    "llama3": ("LlamaConfig", "LlamaForCausalLM",
               dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                     "rope_theta": 500.0})),
    "llama_yarn": ("LlamaConfig", "LlamaForCausalLM",
                   dict(rope_parameters={**YARN, "beta_fast": 8, "beta_slow": 2}, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    # Sliding windows several times shorter than the prompts: every layer (Mistral), the layers from
    # max_window_layers on (Qwen2, whose first layer stays full).
    "mistral_swa": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=6)),
    # Phi-3: the Llama block stored with fused qkv_proj and gate_up_proj, a window on every layer.
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=7)),
    "qwen2_swa": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=5,
                                                          max_window_layers=1)),
    # One KV head: TP = 2 replicates it, and its bias, on both ranks (the fused-QKV kind, not a plain split).
    "qwen2_yarn": ("Qwen2Config", "Qwen2ForCausalLM",
                   dict(rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 0.5}, num_key_value_heads=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, rope_parameters=YARN)),
    # Gemma: local layers (windows 5 and 6) between global ones, scores scaled by query_pre_attn_scalar (not
    # head_dim), Gemma 2's attention and final softcaps low enough to bite, Gemma 3's q/k norms and local RoPE base
    # beside a linearly scaled global RoPE.
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=5,
                                                         attn_logit_softcapping=3.0, final_logit_softcapping=4.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(head_dim=32, query_pre_attn_scalar=24, sliding_window=6,
                    layer_types=["sliding_attention", "full_attention"],
                    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                   initializer_range=0.2, bos_token_id=1, eos_token_id=None,
                                                   pad_token_id=0)),
}

# Mixture-of-experts families, each on LLAMA_SIZES (hidden 64, 2 layers unless said) with 4 or 8 experts of 32 and
# dense layers of 96: every routing rule of MoEDims, dense layers beside MoE ones, shared experts (Qwen2-MoE's gated).
# Kept apart from FAMILIES until cptoolkit's MoE layer runs them through the engine.
_MLA = dict(kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, num_key_value_heads=4)
MOE_FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2,
                                                            intermediate_size=32)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=48)),
    # Renormalised top-k and MoE on every other layer (layer 1 of 0..2); plain top-k with layer 1 dense.
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_hidden_layers=3, head_dim=32, num_experts=8, num_experts_per_tok=2,
                       moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=2)),
    "qwen3_moe_mlp_only": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                           dict(num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                norm_topk_prob=False, mlp_only_layers=[1])),
    # V2: greedy over every expert on every layer (first_k_dense_replace 0), two shared experts, no q bottleneck;
    # group-limited greedy (the best 2 of 4 groups by their best score), a dense first layer, scaled weights.
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(**_MLA, q_lora_rank=None, n_routed_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=32, n_shared_experts=2, first_k_dense_replace=0,
                         topk_method="greedy")),
    "deepseek_v2_group": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                          dict(**_MLA, q_lora_rank=32, n_routed_experts=8, num_experts_per_tok=3,
                               moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
                               topk_method="group_limited_greedy", n_group=4, topk_group=2,
                               routed_scaling_factor=1.5)),
    # V3: sigmoid scores steered by a random e_score_correction_bias (perturbed), the best 2 of 4 groups by their
    # top-two sum, renormalised and scaled by 2.5, a dense first layer, one shared expert.
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(**_MLA, q_lora_rank=32, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                         n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
                         routed_scaling_factor=2.5, norm_topk_prob=True)),
    # gpt-oss: learned sinks, q/k/v/o biases, windowed and full layers alternating (window 6, shorter than the
    # prompts), YaRN past 16 positions, router and expert biases, a clamped SwiGLU whose limit (1.5) the random
    # weights reach, so the clamps matter.
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, head_dim=16, sliding_window=6,
                     swiglu_limit=1.5, rope_parameters={**YARN, "beta_fast": 8, "beta_slow": 2, "truncate": False})),
}


def word_tokenizer(chat_template: str | None = None):
    """Word-level over ``<unk>`` (0), ``w1 .. w{VOCAB-1}`` and ``<eos>`` (``EOS``), split on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, VOCAB)}, "<eos>": EOS}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>",
                                                chat_template=chat_template)


def byte_level_tokenizer(chat_template: str | None = None):
    """A byte-level BPE whose pieces (``Ġ`` (a space), ``w``, ``0`` .. ``9``, then fillers) spell the words of
    ``word_tokenizer``: ``"w5 w9"`` is ``w 5 Ġ w 9``. For Qwen2 checkpoints, whose tokenizer transformers 5 rebuilds
    as a byte-level BPE from the vocabulary of tokenizer.json (a word-level one then encodes text to nothing)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    pieces = ["<unk>", "Ġ", "w", *"0123456789"]
    vocab = {**{piece: i for i, piece in enumerate(pieces)}, **{f"x{i}": i for i in range(len(pieces), VOCAB)},
             "<eos>": EOS}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>",
                                                chat_template=chat_template)


def perturbed(model):
    """``model`` in eval mode with every norm weight and bias (transformers starts them at 1 and 0) moved by
    N(0, 0.2²), so that one loaded into the wrong place changes the logits, and DeepSeek-V3's
    ``e_score_correction_bias`` (a buffer, started at 0) drawn N(0, 0.5²), so that it changes which experts the
    sigmoid scores (spread over (0, 1)) choose."""
    model = model.eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.2)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 0.5)
    return model


def hf_config(name: str):
    """The transformers config of ``FAMILIES[name]`` or ``MOE_FAMILIES[name]``."""
    config_class, _, arguments = FAMILIES[name] if name in FAMILIES else MOE_FAMILIES[name]
    sizes = {} if name == "gpt2" else LLAMA_SIZES
    return getattr(transformers, config_class)(**{**sizes, **copy.deepcopy(arguments)})


def hf_model(name: str):
    """The random model of ``hf_config(name)`` (draws from torch's global generator: seed it first)."""
    model_class = (FAMILIES[name] if name in FAMILIES else MOE_FAMILIES[name])[1]
    return perturbed(getattr(transformers, model_class)(hf_config(name)))


def save_checkpoint(model, directory: str | Path, chat_template: str | None = None) -> str:
    """``model`` and its tokenizer with ``chat_template`` (``byte_level_tokenizer`` for Qwen2, else
    ``word_tokenizer``) saved as a Hugging Face checkpoint in ``directory``."""
    model.save_pretrained(directory)
    tokenizer = byte_level_tokenizer if model.config.model_type == "qwen2" else word_tokenizer
    tokenizer(chat_template).save_pretrained(directory)
    return str(directory)


def recorded_logits(engine) -> dict[int, list[torch.Tensor]]:
    """Every logits row the engine samples a token from, per request index, in order (the engine's sampling
    step, wrapped on this instance only)."""
    rows, sample = defaultdict(list), engine.sampler.sample

    def recording(logits, requests):
        for row, request in zip(logits, requests):
            rows[request.index].append(row.clone())
        return sample(logits, requests)

    engine.sampler.sample = recording
    return rows


def greedy_reference(model, prompts: list[list[int]], max_new: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """transformers' own greedy continuation of each prompt (``max_new`` tokens) and the logits each new token was
    chosen from (one forward over the prompt and all new tokens but the last: ``[max_new, vocab]`` per prompt)."""
    tokens, logits = [], []
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False)
            tokens.append(out[0, len(prompt):].tolist())
            logits.append(model(out[:, :-1]).logits[0][len(prompt) - 1:])
    return tokens, logits
