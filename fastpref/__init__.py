"""fastpref: fast preference optimisation and RL fine-tuning of language models.

Layers, one direction of imports: ``fastpref.kernels`` (Triton) -> ``fastpref.ops`` (differentiable ops
with a PyTorch twin each) -> ``fastpref.losses`` (every objective, plain and fused) -> ``fastpref.train``.
"""

__version__ = "0.1.0"
