"""What a server serves: one base model and any number of Q-Adapters and stacks trained on it.

All adapters live in ONE ``peft.PeftModel`` (PEFT loads each as a named adapter onto the same base
weights; a stack's k adapters are k named adapters there), so the base weights are in memory once
however many are served. Only the folders given at start-up are ever loaded: a request picks a
model by its name, never by a path.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..backbone import base_fingerprint
from ..loading import folder_kind, load, read_folder
from ..settings import CONFIG_NAME, QAdapterSettings
from ..stack import STACK_CONFIG, QAdapterStack

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


@dataclass
class ServedAdapter:
    name: str  # the public name (the request's ``model``)
    peft_name: str  # its name inside the PeftModel (a stack: its last adapter's)
    path: str
    settings: QAdapterSettings  # a stack: its last adapter's
    #: a stack (``qadapter train --on``): the view that decodes it, over the served PeftModel
    stack: QAdapterStack | None = None


@dataclass
class ServedModels:
    """The network, its tokenizer, the base model's public name and the adapters by public name."""

    model: object  # peft.PeftModel
    tokenizer: object
    base_name: str
    adapters: dict[str, ServedAdapter] = field(default_factory=dict)
    context_length: int = 2048
    #: tokenizers are shared by the request handlers (encode) and the decoder thread (decode)
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, adapters: dict[str, str], base_model: str | None = None, base_name: str | None = None,
             device: str | None = None) -> "ServedModels":
        """Load every adapter folder (``{public name: folder}``) onto one base model.

        The first folder loads the base it was trained on (or ``base_model``); every other folder must
        have been trained on the same base weights (its saved fingerprint is checked).
        """
        if not adapters:
            raise ValueError("give at least one adapter (NAME=PATH)")
        for name, path in adapters.items():
            if not NAME_RE.match(name):
                raise ValueError(f"adapter name {name!r}: use letters, digits and . _ : - (at most 64 characters)")
            if folder_kind(path) not in ("qadapter", "stack"):
                raise ValueError(f"adapter {name!r}: {path} holds no {CONFIG_NAME} or {STACK_CONFIG}: is it a folder "
                                 "saved by qadapter?")
        items = list(adapters.items())
        first_name, first_path = items[0]
        first = load(first_path, base_model=base_model)  # one loader: qadapter.loading
        model, tokenizer = first.model, first.tokenizer
        if first.kind == "stack":
            stack = first.policy
            source = stack.base_model_name_or_path
            fingerprint = stack.base_fingerprint or base_fingerprint(model)
            served = {first_name: ServedAdapter(first_name, stack.names[-1], str(first_path), stack.settings[-1], stack)}
        else:
            qa = first.policy
            source = qa.settings.base_model_name_or_path
            fingerprint = base_fingerprint(model)
            peft_first = model.active_adapter if isinstance(model.active_adapter, str) else "default"
            served = {first_name: ServedAdapter(first_name, peft_first, str(first_path), qa.settings)}
        if device:
            model.to(device)
        model.eval()
        for i, (name, path) in enumerate(items[1:], start=1):
            if folder_kind(path) == "stack":
                spec = read_folder(path)[0]
                if spec.base_fingerprint and spec.base_fingerprint != fingerprint:
                    raise ValueError(f"stack {name!r} ({path}) was trained on another base model (fingerprint "
                                     f"{spec.base_fingerprint}, served base {fingerprint}); one server serves "
                                     "adapters of one base model")
                names = [f"qadapter_{i}_{j}" for j in range(len(spec.folders))]
                for peft_name, folder in zip(names, spec.folders):
                    model.load_adapter(str(folder), adapter_name=peft_name)
                view = QAdapterStack(model, tokenizer, names, spec.settings,
                                     base_model_name_or_path=spec.base_model_name_or_path,
                                     base_fingerprint=spec.base_fingerprint)
                served[name] = ServedAdapter(name, names[-1], str(path), spec.settings[-1], view)
                continue
            settings = QAdapterSettings.from_file(Path(path) / CONFIG_NAME)
            if settings.base_fingerprint and settings.base_fingerprint != fingerprint:
                raise ValueError(f"adapter {name!r} ({path}) was trained on another base model "
                                 f"(fingerprint {settings.base_fingerprint}, served base {fingerprint}); "
                                 "one server serves adapters of one base model")
            peft_name = f"qadapter_{i}"
            model.load_adapter(str(path), adapter_name=peft_name)
            served[name] = ServedAdapter(name, peft_name, str(path), settings)
        if device:
            model.to(device)
        model.eval()
        first_served = served[first_name]
        if first_served.stack is None:
            model.set_adapter(first_served.peft_name)
        if base_name is None:
            source = source or base_model or "base"
            base_name = Path(str(source).rstrip("/")).name or "base"
        if base_name in served:
            raise ValueError(f"the base model's name {base_name!r} is also an adapter's name; pick another "
                             "with --base-name")
        if not NAME_RE.match(base_name):
            base_name = "base"
        config = model.get_base_model().config
        context = int(getattr(config, "max_position_embeddings", None) or 2048)
        return cls(model, tokenizer, base_name, served, context)

    def names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_base_model().get_input_embeddings().weight.shape[0])
