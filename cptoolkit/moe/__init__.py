"""Mixture-of-Experts with expert parallelism inside cptoolkit's TP x PCP x DCP layout.

``routing``: which experts each token takes and with what weight (``MoEDims``' rule, every family's);
``collectives``: the counted, differentiable collectives the layer issues; ``layer``: ``MoELayer``, the megatron
``mlp`` submodule that routes, dispatches over the expert-parallel group and combines.
"""
