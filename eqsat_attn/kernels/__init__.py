"""Attention kernels: the plain-JAX reference semantics, Pallas flash attention and decode."""

from .decode_attention import decode_attention
from .dispatch import attention, chosen_kernel, kernel_supports_layouts, pallas_available, pallas_takes_scores
from .flash_attention import flash_attention
from .reference import attention_reference

__all__ = ["attention", "attention_reference", "chosen_kernel", "decode_attention", "flash_attention",
           "kernel_supports_layouts", "pallas_available", "pallas_takes_scores"]
