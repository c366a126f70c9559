"""Context-parallel attention: DualChunkSwap ring prefill, DCP sharded-KV decode, LSE merge."""
