"""eqsat-attn: equality-saturation optimizer for JAX programs."""
