"""vLLM's general-plugin hook (entry point ``vllm.general_plugins``, pyproject.toml): vLLM calls
:func:`register` in every process it starts. It only names the class, lazily, so that loading the
plugin imports nothing heavy (:mod:`qadapter.vllm.model` is imported when vLLM builds the model)."""

from .launch import ARCHITECTURE


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "qadapter.vllm.model:QAdapterForCausalLM")
