"""Training with prefill context parallelism: data (corpus, batches, DualChunkSwap slicing) and the trainer."""
