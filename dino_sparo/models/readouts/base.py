"""The read-out interface: what turns the final-normed token outputs of the (possibly shortened) encoder into the
encoding that the DINO head, the k-NN and the linear probe use.

A read-out is one :class:`Readout` subclass in a module of its own, plus one line in the registry
(:data:`dino_sparo.models.readouts.READOUTS`). It declares, and nothing outside it decides:

- its flags and their defaults (:attr:`Readout.options`; the command lines, the saved args, resuming and the
  evaluations all read them from there);
- its output size (:attr:`Readout.output_dim`) and how many final blocks it replaces by default
  (:attr:`Readout.replaced_blocks`);
- its attention maps, where it has any (:meth:`Readout.attention_maps`);
- its parameter groups (:meth:`Readout.parameter_group`: lr multiplier, weight decay);
- how to recognise it, and its flags, from a state dict (:meth:`Readout.recognise`, :meth:`Readout.infer_options`);
- its linear-probe features (:meth:`Readout.probe_features`, :attr:`Readout.probe_cls_blocks`).

The backbone stores the read-out as its attribute :attr:`Readout.state_prefix`, so that its tensors are named
``<state_prefix>.*`` in every state dict (``sparo.*`` for SPARO, as in every checkpoint this project wrote).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

# What an option changes, which decides where its flag appears and whether resuming compares it.
ARCHITECTURE = "architecture"  # tensors depend on it: saved, compared on resume, restored by the evaluations
INITIALISATION = "initialisation"  # only the initial values: a training flag, free to differ on resume
OPTIMISATION = "optimisation"  # only the parameter groups: a training flag, not a model argument


@dataclass(frozen=True)
class Option:
    """One flag of a read-out: ``--<flag>`` on the command line, ``config[flag]`` in a model config, the
    constructor argument ``argument`` (default: the flag without the read-out's name, ``sparo_slots`` ->
    ``slots``). With ``derived``, the default is derived from the backbone's ``(embed_dim, num_heads)`` instead;
    ``retrofit_default`` replaces the default in a run that freezes trained blocks (``--freeze_blocks``). Where a flag
    is not given, :class:`~dino_sparo.models.config.ModelConfig` decides its value from these."""
    flag: str
    type: Callable[[str], Any]
    default: Any
    help: str
    role: str = ARCHITECTURE
    argument: str | None = None
    derived: Callable[[int, int], Any] | None = None
    retrofit_default: Any = None

    def argument_name(self, readout_name: str) -> str:
        return self.argument or self.flag.removeprefix(f"{readout_name}_")


class Readout(nn.Module):
    """Base class of the read-outs: ``forward(tokens)`` maps (B, N, D) tokens (CLS first, then patches) to the
    (B, :attr:`output_dim`) encoding.

    ``num_prefix_tokens`` is the number of tokens before the patch tokens in what the read-out is given (1: the
    CLS token).
    """

    name: ClassVar[str]
    summary: ClassVar[str]  # one phrase for --help
    options: ClassVar[tuple[Option, ...]] = ()
    state_prefix: ClassVar[str]  # the backbone attribute holding the read-out, hence its state-dict prefix
    replaced_blocks: ClassVar[int] = 0  # final transformer blocks it replaces unless --readout_replace_blocks
    map_label: ClassVar[str | None] = None  # what one attention map is ("slot", "head"); None: no maps
    probe_cls_blocks: ClassVar[int] = 0  # CLS tokens of the last n blocks the linear probe adds by default

    def __init__(self, embed_dim: int, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_prefix_tokens = num_prefix_tokens

    @property
    def output_dim(self) -> int:
        return self.embed_dim

    @classmethod
    def from_config(cls, config: Mapping[str, Any], embed_dim: int, num_heads: int,
                    num_prefix_tokens: int = 1) -> Readout:
        """The read-out a model config describes (its options are looked up by flag name)."""
        arguments = {}
        for option in cls.options:
            if option.role == OPTIMISATION or option.flag not in config:
                continue
            value = config[option.flag]
            if value is None:
                value = option.derived(embed_dim, num_heads) if option.derived is not None else option.default
            arguments[option.argument_name(cls.name)] = value
        return cls(embed_dim, num_prefix_tokens=num_prefix_tokens, **arguments)

    # ----------------------------------------------------------------------------------------- attention maps
    @property
    def has_attention_maps(self) -> bool:
        return self.map_label is not None

    @property
    def num_maps(self) -> int:
        """Attention maps per image (slots, heads); 0 without maps."""
        return 0

    def attention_maps(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, M, N) attention of each of the M maps over the N tokens it reads; rows sum to 1."""
        raise ValueError(f"the {self.name!r} read-out has no attention maps")

    # ------------------------------------------------------------------------------------------------- slots
    @property
    def slot_layout(self) -> tuple[int, int] | None:
        """(L, V) when the encoding is L slots of V dimensions each (slot l is dims l*V..(l+1)*V), else None."""
        return None

    # ---------------------------------------------------------------------------------------- linear probe
    def probe_features(self, tokens: torch.Tensor, slots: Sequence[int] | None = None) -> torch.Tensor | None:
        """The read-out's part of the linear probe's input, from the final-normed tokens; None when the probe
        takes CLS tokens only (the CLS read-out, whose encoding is the last of them)."""
        return self(tokens)

    # ---------------------------------------------------------------------------------------------- training
    @classmethod
    def parameter_group(cls, config: Mapping[str, Any], name: str, param: nn.Parameter) -> tuple[float, bool | None]:
        """(learning-rate multiplier, decayed?) of the read-out's parameter ``name`` (relative to the read-out);
        None for "decayed" keeps DINO's rule (weights decayed, biases and 1-D parameters not)."""
        return 1.0, None

    # ------------------------------------------------------------------------------------------- state dicts
    @classmethod
    def recognise(cls, state_dict: Mapping[str, Any]) -> bool:
        """Whether a backbone state dict holds this read-out's tensors."""
        return any(key.startswith(f"{cls.state_prefix}.") for key in state_dict)

    @classmethod
    def infer_options(cls, state_dict: Mapping[str, torch.Tensor], embed_dim: int,
                      num_heads: int) -> dict[str, Any]:
        """The options the tensors show, for checkpoints without saved args (flags never given are inferred)."""
        return {}

    def extra_repr(self) -> str:
        return f"output_dim={self.output_dim}"


def restrict_to_slots(features: torch.Tensor, slots: Sequence[int], slot_dim: int) -> torch.Tensor:
    """The concatenation of ``slots`` (slot l is dims l*V..(l+1)*V) of each row, L2-normalised as a whole."""
    index = (torch.as_tensor(list(slots), device=features.device).view(-1, 1) * slot_dim
             + torch.arange(slot_dim, device=features.device)).flatten()
    return F.normalize(features.index_select(1, index), dim=1)
