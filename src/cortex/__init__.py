"""cortex: one OpenAI- and Anthropic-compatible API over a fleet of GPU hosts."""

__version__ = "0.1.0"
