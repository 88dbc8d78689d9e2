"""rexrag: train LLM search agents with REX-RAG (probe exploration + policy correction)."""

__version__ = "0.1.0"
