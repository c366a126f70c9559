"""Benchmarks of cptoolkit's context-parallel attention on CPU ranks; ``python bench/run_all.py --quick``."""
