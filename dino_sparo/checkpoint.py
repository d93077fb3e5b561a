"""Reading checkpoints safely and loading weights (this project's and DINO-format ones) into models."""
from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .cli import UserError

_PREFIXES = ("module.", "backbone.", "_orig_mod.")


def load_checkpoint_file(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with one-line :class:`UserError`s for bad files.

    ``weights_only=True`` refuses pickled objects that could run code when unpickled.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        message = str(error)
        unsafe = re.search(r"GLOBAL ([\w.]+)", message)
        if unsafe:
            raise UserError(f"refusing to load {path}: it holds a pickled {unsafe.group(1)}, which could run code "
                            f"when loaded (only tensors and plain containers are accepted)") from None
        raise UserError(f"{path} is not a readable PyTorch checkpoint (corrupt or another format)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        reason = str(error).strip().split(". ")[0] if str(error).strip() else "file is empty or truncated"
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({reason})") from None
    except Exception:  # noqa: BLE001 - arbitrary bytes can fail the unpickler in any way (IndexError, KeyError...)
        raise UserError(f"{path} is not a readable PyTorch checkpoint (corrupt or another format)") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def select_state_dict(checkpoint: Any, checkpoint_key: str | None, path: str = "checkpoint") -> dict[str, Any]:
    """The state dict under ``checkpoint_key`` (``teacher``, ``student``, ...), or the checkpoint itself when it
    is a bare state dict, as the official DINO backbone weights are."""
    if not isinstance(checkpoint, Mapping):
        raise UserError(f"{path} does not hold a dictionary of weights (found {type(checkpoint).__name__})")
    if checkpoint_key and checkpoint_key in checkpoint and isinstance(checkpoint[checkpoint_key], Mapping):
        return dict(checkpoint[checkpoint_key])
    if _is_state_dict(checkpoint):
        return dict(checkpoint)
    candidates = sorted(k for k, v in checkpoint.items() if isinstance(v, Mapping) and _is_state_dict(v))
    raise UserError(f"{path} has no key {checkpoint_key!r}; keys holding weights: "
                    f"{', '.join(candidates) if candidates else 'none'}")


def strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Removes DDP's ``module.``, the multi-crop wrapper's ``backbone.`` and torch.compile's ``_orig_mod.``."""
    cleaned = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        cleaned[key] = value
    return cleaned


@dataclass
class LoadReport:
    """What :func:`load_weights` did, for printing."""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        if self.missing:
            lines.append(f"missing (left at initialisation): {summarise_keys(self.missing)}")
        if self.unused:
            lines.append(f"unused from the checkpoint: {summarise_keys(self.unused)}")
        lines.extend(self.notes)
        return "\n".join(lines)


def summarise_keys(keys: list[str]) -> str:
    """Collapses ``blocks.11.*`` style groups so a report stays readable."""
    groups: dict[str, int] = {}
    for key in keys:
        match = re.match(r"^(blocks\.\d+|sparo|head)\.", key)
        group = f"{match.group(1)}.*" if match else key
        groups[group] = groups.get(group, 0) + 1
    return ", ".join(f"{group} ({count})" if count > 1 else group for group, count in groups.items())


def load_weights(module: nn.Module, state_dict: Mapping[str, Any], what: str = "model") -> LoadReport:
    """Loads matching keys non-strictly; a shape mismatch is a :class:`UserError` naming the tensor."""
    own = module.state_dict()
    for key, value in state_dict.items():
        if key in own and own[key].shape != value.shape:
            raise UserError(f"checkpoint does not match the {what} architecture: {key} has shape "
                            f"{tuple(value.shape)} in the checkpoint but {tuple(own[key].shape)} in the model "
                            f"(check --arch, --patch_size and the SPARO flags)")
    result = module.load_state_dict(dict(state_dict), strict=False)
    unused = list(result.unexpected_keys)
    loaded = [k for k in state_dict if k not in set(unused)]
    return LoadReport(loaded=loaded, missing=list(result.missing_keys), unused=unused)


def load_pretrained_weights(model: nn.Module, path: str | os.PathLike, checkpoint_key: str | None = "teacher",
                            verbose: bool = True) -> LoadReport:
    """Loads a backbone from this project's checkpoints or DINO-format ones and reports what happened.

    Accepts ``teacher``/``student`` sub-dicts or a bare state dict, strips ``module.``/``backbone.`` prefixes
    and ignores DINO head entries. Loading a 12-block DINO checkpoint into a SPARO model fills the shared
    blocks; the replaced block(s) are reported as dropped and SPARO keeps its fresh initialisation.
    """
    checkpoint = load_checkpoint_file(path)
    state_dict = strip_prefixes(select_state_dict(checkpoint, checkpoint_key, os.fspath(path)))
    head_keys = [k for k in state_dict if k.startswith("head.")]
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    if not state_dict:
        raise UserError(f"{os.fspath(path)} (key {checkpoint_key!r}) holds no backbone weights")
    report = load_weights(model, state_dict, "backbone")
    if head_keys:
        report.notes.append(f"ignored {len(head_keys)} DINO head tensors (head.*): a backbone has no head")
    dropped_blocks = sorted({int(m.group(1)) for k in report.unused if (m := re.match(r"^blocks\.(\d+)\.", k))})
    if dropped_blocks and getattr(model, "sparo", None) is not None:
        report.notes.append(
            f"dropped block(s) {', '.join(map(str, dropped_blocks))} and the final CLS path: replaced by the "
            f"SPARO read-out, which starts from its initialisation ({sum(k.startswith('sparo.') for k in report.missing)} "
            f"SPARO tensors)")
    if not report.loaded:
        raise UserError(f"no tensor of {os.fspath(path)} matches this model; is it a ViT checkpoint?")
    if verbose:
        print(f"weights from {os.fspath(path)} (key {checkpoint_key!r}):\n{report}", flush=True)
    return report


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Writes ``state`` with ``torch.save`` to a temporary file next to ``path``, flushes it to disk and
    renames it over ``path``, so a crash mid-save leaves the previous checkpoint intact."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            torch.save(dict(state), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike) -> list[str]:
    """Deletes the temporary files of :func:`save_checkpoint` that a process killed mid-save left behind (their
    writer is no longer running); returns their names. Resuming never reads them: they only waste space."""
    removed = []
    for name in sorted(os.listdir(directory)):
        match = _TEMPORARY.match(name)
        if match and (int(match.group(1)) == os.getpid() or not _process_exists(int(match.group(1)))):
            try:
                os.remove(os.path.join(directory, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed


def restart_from_checkpoint(path: str | os.PathLike, expected_args: Mapping[str, Any] | None = None,
                            **objects: Any) -> dict[str, Any] | None:
    """Restores every object given by keyword (anything with ``load_state_dict``) from the entry of the same
    name in the checkpoint at ``path``. Returns the checkpoint (for its ``epoch`` and ``args``), or None when
    there is no file. Model weights load strictly: resuming into a different architecture is a
    :class:`UserError`, not a silent partial load; with ``expected_args`` (flag name -> value of this run) the
    error names each flag whose value differs from the checkpoint's saved ``args``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return None
    checkpoint = load_checkpoint_file(path)
    if not isinstance(checkpoint, Mapping):
        raise UserError(f"{path} is not a training checkpoint (found {type(checkpoint).__name__})")
    saved_args = checkpoint.get("args")
    if expected_args and isinstance(saved_args, Mapping):
        differences = [f"--{name} {saved_args[name]} (this run: {value})" for name, value in expected_args.items()
                       if name in saved_args and _normalised(saved_args[name]) != _normalised(value)]
        if differences:
            raise UserError(f"{path} was written by a run with other architecture flags: {'; '.join(differences)}. "
                            f"Pass the same flags to resume it, or use another --output_dir to start afresh")
    for name, obj in objects.items():
        if obj is None:
            continue
        if name not in checkpoint or checkpoint[name] is None:
            raise UserError(f"{path} has no {name!r} entry to resume from")
        try:
            if isinstance(obj, nn.Module):
                state = strip_prefixes_keep_wrapper(checkpoint[name])
                obj.load_state_dict(state, strict=True)
            else:
                obj.load_state_dict(checkpoint[name])
        except (RuntimeError, ValueError, KeyError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"cannot resume {name} from {path}: {first_line} (was it written with other "
                            f"architecture flags? use another --output_dir to start afresh)") from None
    return dict(checkpoint)


def _normalised(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def strip_prefixes_keep_wrapper(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Removes only DDP's ``module.`` and torch.compile's ``_orig_mod.``, keeping ``backbone.``/``head.``
    (the multi-crop wrapper's own layout)."""
    cleaned = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    return cleaned
