"""qadapter: customize a chat LLM to new preferences without forgetting (Q-Adapter, ICLR 2025)."""

__version__ = "0.1.0"
