"""CUDA tests (``make test-gpu``): each is marked ``gpu`` and skipped, with its reason, where there is no GPU."""
