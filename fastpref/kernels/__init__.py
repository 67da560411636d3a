"""Triton kernels (installed as ``fastpref.kernels``): one file per kernel family, no autograd."""
