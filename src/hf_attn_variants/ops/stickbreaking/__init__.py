"""Stick-breaking attention kernels (Triton): parallel prefill/training and split-K decoding."""

from .decoding import decode_stickbreaking_attn
from .parallel import parallel_stickbreaking_attn

__all__ = ["parallel_stickbreaking_attn", "decode_stickbreaking_attn"]
