"""The model config: which backbone and read-out a model is, resolved once, with every default decided here.

A value comes from the flags given (not None), else a checkpoint's saved args, else what its weights show
(:mod:`.inference`, for checkpoints without saved args such as DINO's official ones), else the default: the arch's
for ``patch_size``, ``depth`` and ``num_registers``, the read-out's for ``readout_replace_blocks`` and its options
(each :class:`~.readouts.Option` declares its default, a default derived from the backbone's width and heads, and
the default of a retrofit that freezes trained blocks).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..cli import ARCH_ALIASES
from ..errors import UserError
from .backbone import replaced_blocks
from .readouts import ARCHITECTURE, INITIALISATION, READOUTS, Option
from .vision_transformer import ARCHS, ArchSpec

# The backbone's flags, in the order they are printed; the read-outs' options follow them in a model config.
BACKBONE_FLAGS = ("arch", "patch_size", "depth", "readout", "readout_replace_blocks", "num_registers",
                  "readout_sees_registers", "pos_embed_interpolation")
# Defaults of the backbone flags the arch does not set (``patch_size``, ``depth``, ``num_registers`` it does).
BACKBONE_DEFAULTS: dict[str, Any] = {"arch": "vit_small", "readout": "sparo", "readout_sees_registers": False,
                                     "pos_embed_interpolation": "dino"}
# Every read-out's options by flag name: a model config carries them all, the chosen read-out reads its own.
READOUT_OPTIONS: dict[str, Option] = {option.flag: option for readout in READOUTS.values()
                                      for option in readout.options}
MODEL_FLAGS = BACKBONE_FLAGS + tuple(READOUT_OPTIONS)


def canonical_arch(arch: str | None) -> str:
    """``arch`` with DINO's DeiT aliases replaced (None: the default arch)."""
    arch = arch or BACKBONE_DEFAULTS["arch"]
    return ARCH_ALIASES.get(arch, arch)


@dataclass(frozen=True)
class ModelConfig:
    """A backbone and its read-out, every value decided (build it with :func:`~.factory.build_backbone`).

    ``options`` holds every registered read-out's options as ``(flag, value)`` pairs (immutable and picklable); the
    chosen read-out reads its own, the others are carried so that a saved config is complete.
    """
    arch: str
    patch_size: int
    depth: int
    readout: str
    readout_replace_blocks: int
    num_registers: int
    readout_sees_registers: bool
    pos_embed_interpolation: str | None  # None for archs without absolute position embeddings (DINOv3's RoPE)
    options: tuple[tuple[str, Any], ...]

    @classmethod
    def resolve(cls, given: Mapping[str, Any], saved: Mapping[str, Any] | None = None,
                weights: Mapping[str, Any] | None = None, retrofit: bool = False,
                notes: list[str] | None = None) -> ModelConfig:
        """The config of ``given`` flags (None or absent: not given), completed from ``saved`` args, else from the
        backbone ``weights``, else by the defaults; ``retrofit`` (trained blocks frozen) selects the read-out
        options' retrofit defaults, each of them announced in ``notes`` when given."""
        values = {name: given.get(name) for name in MODEL_FLAGS}
        if saved is not None:
            values = {name: saved.get(name) if value is None else value for name, value in values.items()}
        elif weights is not None:
            from .inference import infer_model_flags

            values = infer_model_flags(weights, values)
        arch = canonical_arch(values["arch"])
        if arch not in ARCHS:
            raise UserError(f"unknown arch {arch!r}; choose from {', '.join([*ARCHS, *ARCH_ALIASES])}")
        spec = ARCHS[arch]
        values["arch"] = arch
        if not spec.absolute_positions:
            if given.get("pos_embed_interpolation") is not None:
                raise UserError(f"--pos_embed_interpolation does not apply to {arch}: it has no absolute position "
                                f"embeddings to resample (RoPE)")
            values["pos_embed_interpolation"] = None  # what older checkpoints saved for it means nothing here
        for name, default in {**BACKBONE_DEFAULTS, **spec.flag_defaults()}.items():
            if values[name] is None and (name != "pos_embed_interpolation" or spec.absolute_positions):
                values[name] = default
        if values["readout"] not in READOUTS:
            raise UserError(f"unknown read-out {values['readout']!r}; choose from {', '.join(READOUTS)}")
        values["readout_replace_blocks"] = replaced_blocks(values["readout"], values["readout_replace_blocks"])
        own = {option.flag for option in READOUTS[values["readout"]].options}
        for flag, option in READOUT_OPTIONS.items():
            if values[flag] is not None:
                continue
            if retrofit and option.retrofit_default is not None:
                values[flag] = option.retrofit_default
                if notes is not None and flag in own:
                    notes.append(f"retrofit (--freeze_blocks): --{flag} {_show(option.retrofit_default)} (from "
                                 f"scratch: {_show(_default(option, spec))}; pass the flag to choose)")
            else:
                values[flag] = _default(option, spec)
        return cls(**{name: values[name] for name in BACKBONE_FLAGS},
                   options=tuple((flag, values[flag]) for flag in READOUT_OPTIONS))

    @property
    def spec(self) -> ArchSpec:
        return ARCHS[self.arch]

    @property
    def readout_options(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def encoder_blocks(self) -> int:
        """Transformer blocks before the read-out: ``depth`` less those the read-out replaces."""
        return self.depth - self.readout_replace_blocks

    def flags(self) -> dict[str, Any]:
        """Every flag of the config by name (backbone flags, then all read-out options): what checkpoints save."""
        return {**{name: getattr(self, name) for name in BACKBONE_FLAGS}, **self.readout_options}

    def readout_flags(self) -> dict[str, Any]:
        """The flags that make this model: the backbone's and the chosen read-out's own (for messages)."""
        own = [option.flag for option in READOUTS[self.readout].options]
        return {name: value for name, value in self.flags().items() if name in BACKBONE_FLAGS or name in own}

    def tensor_flags(self) -> dict[str, Any]:
        """The flags the model's tensors depend on (resuming compares them): all but initialisation-only ones."""
        return {name: value for name, value in self.readout_flags().items()
                if name in BACKBONE_FLAGS or READOUT_OPTIONS[name].role == ARCHITECTURE}

    def model_kwargs(self) -> dict[str, Any]:
        """The backbone constructor's arguments besides the arch's fixed ones and the drop-path rate."""
        own = {option.flag for option in READOUTS[self.readout].options if option.role in (ARCHITECTURE,
                                                                                            INITIALISATION)}
        backbone = {name: getattr(self, name) for name in BACKBONE_FLAGS[1:]}
        if not self.spec.absolute_positions:
            del backbone["pos_embed_interpolation"]
        return {**backbone, **{flag: value for flag, value in self.options if flag in own}}


def _default(option: Option, spec: ArchSpec) -> Any:
    return option.derived(spec.embed_dim, spec.num_heads) if option.derived is not None else option.default


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
