"""Triton kernels, each beside a plain PyTorch reference and a CPU fallback. None yet: the training and
decoding paths run on PyTorch ops; fused kernels come with the GPU-speed work."""
