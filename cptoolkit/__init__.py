"""cptoolkit: TP x PCP x DCP context parallelism for long-context LLM training and inference.

Importing the package needs only torch: GPU libraries (TransformerEngine, flash-attn, triton kernels)
are imported lazily by the code paths that use them.
"""
__version__ = "0.1.0"
