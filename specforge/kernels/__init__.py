"""Triton kernels, each beside a plain PyTorch reference that also serves as the CPU fallback:
TTT attention and the fused loss (training speed), and the batch-invariant set behind the deterministic
switch (`batch_invariant.py`: matmul, RMSNorm, softmax, decode attention)."""
