"""The e-graph stage: egglog language, encode/decode, rule-set driver and extraction."""

from .driver import RunResult, run_rulesets
from .encode import Encoding, encode
from .extract import extract_program
from .rulesets import REGISTRY, RuleSet, load_rule_file, resolve

__all__ = [
    "REGISTRY", "Encoding", "RuleSet", "RunResult", "encode", "extract_program", "load_rule_file",
    "resolve", "run_rulesets",
]
