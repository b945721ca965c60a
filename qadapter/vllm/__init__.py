"""qadapter inside vLLM: a launcher for an exported adapter and a model plugin serving pi-tilde."""
