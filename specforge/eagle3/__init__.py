"""EAGLE-3: the draft head, its training-time-test unroll, the training loop, checkpoints, decoding."""
