"""Saved folders that can be trusted: checksums, structural checks, resumable checkpoints, no pickles
or remote code, no non-finite weights.

Every adapter folder qadapter saves (``save_atomically``) and every training checkpoint
``QAdapterTrainer`` writes gets a manifest, ``qadapter_checksums.json``: each file's size and
SHA-256. :func:`verify_folder` checks a folder against its manifest (a truncated file, a changed
byte, a missing file) and checks each file's structure even without one (JSON parses, safetensors
headers and data are whole, torch's zip archives pass their CRCs), and names the first bad file.
:func:`resolve_resume` turns ``resume_from_checkpoint`` (``auto``, ``True`` or a path) into a
checkpoint that passed those checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Callable

import torch

from .errors import UserError, option

MANIFEST_NAME = "qadapter_checksums.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class NonFiniteError(RuntimeError):
    """A non-finite loss or weight: training stops, nothing non-finite is saved."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike) -> Path:
    """Record the size and SHA-256 of every file under ``folder`` in ``folder/qadapter_checksums.json``."""
    folder = Path(folder)
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME and not path.name.endswith(".tmp"):
            files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    target = folder / MANIFEST_NAME
    tmp = folder / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=1, sort_keys=True), encoding="utf-8")
    tmp.replace(target)
    return target


def _check_structure(path: Path, finite: bool) -> None:
    """Raise UserError naming ``path`` when it is not a whole file of its kind."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    tensor = fh.get_tensor(key)
                    if finite and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                        raise UserError(f"{path}: tensor {key!r} holds non-finite values (NaN or inf); "
                                        "this adapter is broken, retrain it or use an earlier checkpoint")
        elif suffix in (".pt", ".pth", ".bin"):
            if not zipfile.is_zipfile(path):
                raise UserError(f"{path}: truncated or corrupted (not a whole torch archive)")
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                raise UserError(f"{path}: corrupted (its entry {bad!r} fails its CRC check)")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure of a saved file means a damaged file
        raise UserError(f"{path}: truncated or corrupted ({type(e).__name__}: {str(e)[:160]})") from None


def verify_folder(folder: str | os.PathLike, what: str = "folder", *, finite: bool = False) -> Path:
    """Check ``folder`` against its manifest (when it has one) and every file's structure; return it.

    Raises :class:`UserError` naming the first missing, truncated or corrupted file. ``finite``:
    also refuse safetensors files holding NaN or inf.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such {what} folder")
    manifest = folder / MANIFEST_NAME
    if manifest.is_file():
        try:
            listed = json.loads(manifest.read_text(encoding="utf-8"))["files"]
            listed = {str(k): (int(v["size"]), str(v["sha256"])) for k, v in listed.items()}
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{manifest}: corrupted ({type(e).__name__}: {str(e)[:120]})") from None
        for rel, (size, sha) in listed.items():
            path = folder / rel
            if not path.is_file():
                raise UserError(f"{path}: missing from the {what} (it was saved; {MANIFEST_NAME} lists it)")
            found = path.stat().st_size
            if found != size:
                raise UserError(f"{path}: truncated or changed: {found} bytes where {size} were saved")
            if _sha256(path) != sha:
                raise UserError(f"{path}: corrupted: its SHA-256 differs from the one recorded when it was saved")
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            _check_structure(path, finite)
    return folder


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-N`` folders in ``output_dir``, newest (highest N) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def verify_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder that is complete and undamaged (else UserError naming the file)."""
    path = verify_folder(path, "checkpoint")
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"{path / 'trainer_state.json'}: missing, so the checkpoint is incomplete "
                        "(the run was probably stopped while writing it)")
    return path


def resolve_resume(value, output_dir: str | os.PathLike, log: Callable[[str], None] = print) -> str | None:
    """The checkpoint to resume from: ``None``/``""`` none; ``"auto"`` the newest intact checkpoint
    in ``output_dir`` (skipping, and saying so, damaged or half-written ones), or none when there is
    none yet; ``True`` the same but one must exist; a path that checkpoint, checked."""
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "no", "none", "false")):
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() in ("auto", "last", "latest", "true")):
        for candidate in checkpoints(output_dir):
            try:
                found = verify_checkpoint(candidate)
            except UserError as err:
                log(f"qadapter: not resuming from {candidate.name}: {err}")
                continue
            log(f"qadapter: resuming from {found} (step {found.name.split('-')[-1]})")
            return str(found)
        if value is True:
            raise UserError(f"{option('resume_from_checkpoint', True)}: no intact checkpoint in {output_dir}")
        log(f"qadapter: no checkpoint in {output_dir} yet; training from the start")
        return None
    path = Path(value)
    if not path.exists():
        raise UserError(f"{option('resume_from_checkpoint', value)}: no such checkpoint folder")
    return str(verify_checkpoint(path))


def check_finite_weights(model, what: str = "adapter") -> None:
    """Raise :class:`NonFiniteError` when a trainable (or LoRA) weight of ``model`` is NaN or inf."""
    for name, param in model.named_parameters():
        if (param.requires_grad or "lora_" in name) and param.is_floating_point():
            data = param.detach()
            data = data.to_local() if hasattr(data, "to_local") else data  # a DTensor: this rank's shard
            if not torch.isfinite(data).all():
                n = int((~torch.isfinite(data)).sum())
                raise NonFiniteError(f"refusing to save the {what}: {n} values of {name} are not finite "
                                     "(NaN or inf); training diverged. Lower the learning rate or resume "
                                     "from an earlier checkpoint")


def check_no_remote_code(path: str | os.PathLike, trust_remote_code: bool = False) -> None:
    """Refuse a model folder whose config or tokenizer asks to run its own code, unless asked to."""
    folder = Path(path)
    if trust_remote_code or not folder.is_dir():
        return
    for name in ("config.json", "tokenizer_config.json"):
        file = folder / name
        if file.is_file():
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except Exception:  # noqa: BLE001 - a damaged config is reported by whoever loads it
                continue
            if isinstance(data, dict) and data.get("auto_map"):
                raise UserError(f"{file}: the model asks to run its own Python code (auto_map); qadapter "
                                f"runs no remote code unless you pass {option('trust_remote_code', True)}")

