"""The rule sets shipped with eqsat-attn, one file per family (installed as eqsat_attn.rules)."""
