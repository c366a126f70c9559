"""What one engine counts over its lifetime: wall times, tokens, drafts and the collectives of decode steps."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineMetrics:
    """Wall times and counts of one engine's lifetime (every rank measures its own)."""

    prefill_time_s: float = 0.0
    decode_time_s: float = 0.0
    prompt_tokens: int = 0
    prefill_tokens_generated: int = 0
    decode_steps: int = 0
    decode_tokens: int = 0
    decode_rows: int = 0  # requests summed over decode steps
    decode_collectives: int = 0
    decode_bytes_sent: int = 0
    decode_collectives_by_layer: dict[int, int] = field(default_factory=dict)
    draft_tokens: int = 0  # speculative decoding: drafts proposed and verified
    accepted_draft_tokens: int = 0
    draft_collectives: int = 0  # the draft model's own, in decode steps

    def summary(self, kv_bytes_per_rank: int, num_layers: int) -> dict:
        steps = max(self.decode_steps, 1)
        return {
            "draft_tokens": self.draft_tokens,
            "draft_acceptance_rate": self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else 0.0,
            "draft_collectives_per_decode_step": self.draft_collectives / steps,
            "tokens_per_request_step": self.decode_tokens / max(self.decode_rows, 1),
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.prefill_tokens_generated + self.decode_tokens,
            "prefill_time_s": self.prefill_time_s,
            "decode_time_s": self.decode_time_s,
            "decode_steps": self.decode_steps,
            "decode_tokens_per_s": self.decode_tokens / self.decode_time_s if self.decode_time_s else 0.0,
            "kv_bytes_per_rank": kv_bytes_per_rank,
            "collectives_per_decode_step": self.decode_collectives / steps,
            "attention_collectives_per_layer_step": self.decode_collectives / steps / num_layers,
            "collectives_per_decode_step_by_layer": {layer: calls / steps for layer, calls
                                                     in sorted(self.decode_collectives_by_layer.items())},
            "attention_bytes_per_decode_step": self.decode_bytes_sent / steps,
        }
