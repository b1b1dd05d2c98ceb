"""Triton kernels, each beside a plain PyTorch reference that also serves as the CPU fallback:
TTT attention and the fused loss (training speed), and the batch-invariant set behind the deterministic
switch (`batch_invariant.py`: matmul, RMSNorm, softmax, decode attention), and decoding's own: attention over
a cache whose length stays on the device (`cache_attention.py`) and linear layers at 1-16 rows
(`skinny_linear.py`)."""
