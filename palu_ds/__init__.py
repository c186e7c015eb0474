"""palu_ds: a DeepSpeed-based distributed trainer for LLM unlearning (PALU, constrained entropic unlearning, baselines)."""

__version__ = "0.1.0"
