"""specforge: train EAGLE-3 draft heads for speculative decoding, and measure what they buy."""

__version__ = "0.1.0"
