"""The one reader and writer of checkpoints and other outputs.

Reading: every file goes through :func:`read_checkpoint` (``torch.load(weights_only=True)``, one-line errors) or,
for model weights in ``.safetensors``, :func:`~dino_sparo.weight_formats.read_safetensors`; :func:`read_weights`
selects a sub-dict (``teacher``, ``student``, ...), strips wrapper prefixes once and renames official DINOv2/DINOv3
and timm layouts (:mod:`dino_sparo.weight_formats`), then :func:`load_pretrained_weights` loads a backbone
leniently (start from a DINO model) or strictly (evaluate a frozen one), :func:`load_student_weights` adds the DINO
head, and :func:`restart_from_checkpoint` (:func:`restore_state`) resumes training state (what a training run
saves is :class:`dino_sparo.train.state.TrainState`).
Writing: :func:`save_atomic` writes a temporary file, fsyncs it and renames it into place
(:mod:`dino_sparo.utils.files`), so a crash mid-write leaves the previous file intact.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import IO, Any

import torch
from torch import nn

from .errors import UserError
from .utils.files import WriteSink, write_atomic_or_explain
from .weight_formats import is_safetensors, read_safetensors, select_state_dict, strip_prefixes, to_project_layout

logger = logging.getLogger(__name__)
_HEAD_PREFIX = "head."  # the multi-crop wrapper's DINO head


def read_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with one-line :class:`UserError`s for bad files.

    ``weights_only=True`` refuses pickled objects that could run code when unpickled.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(error))
        if unsafe:
            raise UserError(f"refusing to load {path}: it holds a pickled {unsafe.group(1)}, which could run code "
                            f"when loaded (only tensors and plain containers are accepted)") from None
        raise UserError(f"{path} is not a readable PyTorch checkpoint (corrupt or another format)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        reason = str(error).strip().split(". ")[0] if str(error).strip() else "file is empty or truncated"
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({reason})") from None
    except Exception:  # noqa: BLE001 - arbitrary bytes can fail the unpickler in any way (IndexError, KeyError...)
        raise UserError(f"{path} is not a readable PyTorch checkpoint (corrupt or another format)") from None


@dataclass
class Weights:
    """One model's weights read from a checkpoint: the backbone and DINO-head tensors (prefixes stripped) and the
    run's saved args (None for checkpoints without them, such as DINO's official ones), and what was renamed."""
    path: str
    key: str | None
    backbone: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    saved_args: Mapping[str, Any] | None
    conversions: list[str] = field(default_factory=list)


def read_weights(path: str | os.PathLike, checkpoint_key: str | None = "teacher") -> Weights:
    """Reads ``path`` once and splits the weights under ``checkpoint_key`` into backbone and head (a
    ``.safetensors`` file is one backbone, with the config an export stored in it)."""
    path = os.fspath(path)
    if is_safetensors(path):
        checkpoint, saved_args = read_safetensors(path)
        if not checkpoint:
            raise UserError(f"{path} holds no tensors")
    else:
        checkpoint = read_checkpoint(path)
        saved_args = checkpoint.get("args") if isinstance(checkpoint, Mapping) else None
    state = strip_prefixes(select_state_dict(checkpoint, checkpoint_key, path), keep_wrapper=True)
    head = {key[len(_HEAD_PREFIX):]: value for key, value in state.items() if key.startswith(_HEAD_PREFIX)}
    backbone, conversions = to_project_layout(
        strip_prefixes({key: value for key, value in state.items() if not key.startswith(_HEAD_PREFIX)}), path)
    return Weights(path, checkpoint_key, backbone, head, saved_args if isinstance(saved_args, Mapping) else None,
                   conversions)


@dataclass
class LoadReport:
    """What a load did, for printing."""
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
        match = re.match(r"^(blocks\.\d+|[^.]+)\.", key)
        group = f"{match.group(1)}.*" if match else key
        groups[group] = groups.get(group, 0) + 1
    return ", ".join(f"{group} ({count})" if count > 1 else group for group, count in groups.items())


def _load_matching(module: nn.Module, state_dict: Mapping[str, Any], what: str) -> LoadReport:
    """Loads the keys ``module`` has, non-strictly; a shape mismatch is a :class:`UserError` naming the tensor."""
    own = module.state_dict()
    for key, value in state_dict.items():
        if key in own and own[key].shape != value.shape:
            raise UserError(f"checkpoint does not match the {what} architecture: {key} has shape "
                            f"{tuple(value.shape)} in the checkpoint but {tuple(own[key].shape)} in the model "
                            f"(check --arch, dinov2_* for DINOv2 weights, --patch_size and the read-out flags)")
    result = module.load_state_dict(dict(state_dict), strict=False)
    unused = set(result.unexpected_keys)
    return LoadReport(loaded=[k for k in state_dict if k not in unused], missing=list(result.missing_keys),
                      unused=list(result.unexpected_keys))


def load_pretrained_weights(model: nn.Module, source: Weights | str | os.PathLike,
                            checkpoint_key: str | None = "teacher", strict: bool = False, verbose: bool = True,
                            architecture: str | None = None) -> LoadReport:
    """Loads a backbone from this project's checkpoints, DINO-format ones or timm ViT state dicts.

    Lenient (``strict=False``, for starting a run from a trained model): loading a 12-block DINO checkpoint into
    a SPARO model fills the shared blocks, reports the replaced block(s) as dropped and leaves SPARO at its
    initialisation. Strict (for evaluating a frozen model): every parameter of ``model`` must come from the
    checkpoint, else a :class:`UserError` names what is missing (``architecture`` describes the model built).
    """
    weights = source if isinstance(source, Weights) else read_weights(source, checkpoint_key)
    where = f"{weights.path} (key {weights.key!r})"
    if not weights.backbone:
        raise UserError(f"{where} holds no backbone weights")
    report = _load_matching(model, weights.backbone, "backbone")
    if not report.loaded:
        raise UserError(f"no tensor of {weights.path} matches this model; is it a ViT checkpoint?")
    _check_blocks_complete(report, architecture, where)
    report.notes.extend(weights.conversions)
    if strict and report.missing:
        unused = summarise_keys(report.unused) or "none"
        raise UserError(f"{where} does not hold weights for this architecture ({architecture or 'as built'}): "
                        f"missing {summarise_keys(report.missing)}; unused from the checkpoint: {unused}")
    if weights.head:
        report.notes.append(f"ignored {len(weights.head)} DINO head tensors (head.*): a backbone has no head")
    dropped_blocks = sorted({int(m.group(1)) for k in report.unused if (m := re.match(r"^blocks\.(\d+)\.", k))})
    readout = getattr(model, "readout_module", None)
    if dropped_blocks and readout is not None:
        fresh = sum(k.startswith(f"{readout.state_prefix}.") for k in report.missing)
        report.notes.append(f"dropped block(s) {', '.join(map(str, dropped_blocks))}: replaced by the "
                            f"{readout.name.upper()} read-out, which starts from its initialisation ({fresh} "
                            f"tensors)")
    if verbose:
        logger.info(f"weights from {where}:\n{report}")
    return report


def _check_blocks_complete(report: LoadReport, architecture: str | None, where: str) -> None:
    """A block loaded only in part, or registers left out, mean another architecture (DINOv2's LayerScale into a
    DINO ViT, DINOv3's blocks into DINOv2's, or the reverse): features would be silently wrong, so it is a
    :class:`UserError`."""
    def block(key: str) -> str | None:
        match = re.match(r"^(blocks\.\d+)\.", key)
        return match.group(1) if match else None

    loaded_blocks = {block(key) for key in report.loaded} - {None}
    partial_missing = [key for key in report.missing if block(key) in loaded_blocks]
    partial_unused = [key for key in report.unused if block(key) in loaded_blocks or key == "reg_token"]
    if partial_missing or partial_unused:
        def names(keys: list[str]) -> str:
            return ", ".join(sorted({re.sub(r"^blocks\.\d+\.", "blocks.*.", key) for key in keys}))

        found = "; ".join(part for part in (f"missing {names(partial_missing)}" if partial_missing else "",
                                            f"unused {names(partial_unused)}" if partial_unused else "") if part)
        raise UserError(f"{where} is another block architecture than the model ({architecture or 'as built'}): "
                        f"{found}; DINOv2 weights (ls1.gamma) need a dinov2_* --arch (registers: a _reg one), DINOv3's "
                        f"(gamma_1) a dinov3_* one, DINO's a vit_* one")


def load_student_weights(student: nn.Module, path: str | os.PathLike, checkpoint_key: str | None = "teacher",
                         verbose: bool = True) -> None:
    """Starts a multi-crop wrapper (``backbone`` + ``head``) from ``path``: the backbone leniently, the DINO head
    too when its shapes fit (reference-named ``mlp.*`` and ``last_layer.weight_g/_v`` included)."""
    weights = read_weights(path, checkpoint_key)
    load_pretrained_weights(student.backbone, replace(weights, head={}), verbose=verbose)  # the head is loaded below
    if not weights.head:
        return
    own = student.head.state_dict()
    if any(key in own and own[key].shape != value.shape for key, value in weights.head.items()):
        if verbose:
            logger.info(f"head of {weights.path} not loaded: its shapes differ (another --out_dim or read-out size?)")
        return
    report = _load_matching(student.head, weights.head, "head")
    if verbose:
        logger.info(f"head from {weights.path}: loaded {len(report.loaded)} tensors")


def restart_from_checkpoint(path: str | os.PathLike, expected_args: Mapping[str, Any] | None = None,
                            optional: Collection[str] = (),
                            saved_view: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
                            before_restore: Callable[[Mapping[str, Any]], None] | None = None,
                            **objects: Any) -> dict[str, Any] | None:
    """Restores every object given by keyword (anything with ``load_state_dict``) from the entry of the same
    name in the checkpoint at ``path``; returns the checkpoint (for its ``epoch``, ``args``...), or None when
    there is no file.

    Modules load strictly: resuming into another architecture is a :class:`UserError`, not a silent partial
    load. With ``expected_args`` (flag name -> value of this run) the error names each flag whose value
    differs from the checkpoint's saved ``args`` (as ``saved_view`` reads them, e.g. with their defaults decided,
    when given). Entries named in ``optional`` may be absent (the object then keeps its fresh state; the caller
    can tell from the returned checkpoint). ``before_restore`` sees the checkpoint before anything is restored (to
    shape the objects as they were when it was written).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        return None
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, Mapping):
        raise UserError(f"{path} is not a training checkpoint (found {type(checkpoint).__name__})")
    saved_args = checkpoint.get("args")
    if expected_args and isinstance(saved_args, Mapping):
        saved = saved_view(saved_args) if saved_view is not None else saved_args
        differences = [f"--{name} {saved[name]} (this run: {value})" for name, value in expected_args.items()
                       if name in saved and _normalised(saved[name]) != _normalised(value)]
        if differences:
            raise UserError(f"{path} was written by a run with other architecture flags: {'; '.join(differences)}. "
                            f"Pass the same flags to resume it, or use another --output_dir to start afresh")
    if before_restore is not None:
        before_restore(checkpoint)
    restore_state(checkpoint, path, optional, **objects)
    return dict(checkpoint)


def restore_state(checkpoint: Mapping[str, Any], path: str, optional: Collection[str] = (), **objects: Any) -> None:
    """Loads each object given by keyword from the entry of the same name of an already read ``checkpoint``
    (modules strictly, ``module.``/``_orig_mod.`` prefixes removed); see :func:`restart_from_checkpoint`."""
    for name, obj in objects.items():
        if obj is None:
            continue
        if checkpoint.get(name) is None:
            if name in optional:
                continue
            raise UserError(f"{path} has no {name!r} entry to resume from")
        try:
            if isinstance(obj, nn.Module):
                obj.load_state_dict(strip_prefixes(checkpoint[name], keep_wrapper=True), strict=True)
            else:
                obj.load_state_dict(checkpoint[name])
        except (RuntimeError, ValueError, KeyError, TypeError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"cannot restore {name} from {path}: {first_line} (was it written with other "
                            f"flags? use another --output_dir to start afresh)") from None


def _normalised(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to a temporary file next to ``path``, fsynced, then renamed over ``path``.

    A write that fails (a full disk, the folder deleted or made read-only) leaves ``path`` as it was and no
    temporary file, and is a one-line :class:`UserError` naming the folder (for a full disk, the space needed).
    """
    def write(handle: IO[bytes]) -> None:
        sink = WriteSink(handle)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is not None:  # torch.save reports a failed write as "unexpected pos ..."
                raise sink.error from None
            raise

    write_atomic_or_explain(path, write, needed_bytes=lambda: _serialized_size(obj))


def _serialized_size(obj: Any) -> int:
    """Bytes ``torch.save(obj)`` writes, counted without writing them anywhere."""
    sink = WriteSink()
    torch.save(obj, sink)
    return sink.size
