"""qadapter: customize a chat LLM to new preferences without forgetting (Q-Adapter, ICLR 2025).

    from qadapter import QAdapter, QAdapterConfig, QAdapterTrainer

Names are imported lazily, so ``import qadapter`` (and ``qadapter --help``) stays fast.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "QAdapter": "qadapter.modeling",
    "QAdapterSettings": "qadapter.modeling",
    "QAdapterConfig": "qadapter.trainer",
    "QAdapterTrainer": "qadapter.trainer",
    "load_preference_pairs": "qadapter.data",
    "split_by_prompt": "qadapter.data",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qadapter' has no attribute {name!r}")
