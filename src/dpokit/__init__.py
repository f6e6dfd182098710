"""dpokit: Direct Preference Optimization and its relatives for causal language models."""

__version__ = "0.1.0"
