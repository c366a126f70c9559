"""Models assembled from megatron-core modules with cptoolkit's context-parallel attention."""
