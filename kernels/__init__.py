"""Triton kernels, installed as ``recjpq.kernels``; ``recjpq.backends.triton`` is their only caller."""
