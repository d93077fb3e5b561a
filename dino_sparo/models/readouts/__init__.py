"""The read-outs, one module each, and their registry: ``--readout NAME`` builds ``READOUTS[NAME]``.

A new read-out is its module (a :class:`~.base.Readout` subclass) and its line below; nothing else in the package
names it. The order is that of ``--readout``'s choices; the first is the default.
"""
from __future__ import annotations

from .base import ARCHITECTURE, INITIALISATION, OPTIMISATION, Option, Readout, restrict_to_slots
from .cls import CLSReadout
from .gap import GAPReadout
from .map import MAPReadout
from .simpool import SimPoolReadout
from .sparo import SPARO

READOUTS: dict[str, type[Readout]] = {readout.name: readout for readout in (
    SPARO,
    CLSReadout,
    GAPReadout,
    MAPReadout,
    SimPoolReadout,
)}

__all__ = ["ARCHITECTURE", "INITIALISATION", "OPTIMISATION", "READOUTS", "SPARO", "CLSReadout", "GAPReadout",
           "MAPReadout", "Option", "Readout", "SimPoolReadout", "restrict_to_slots"]
