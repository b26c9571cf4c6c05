"""The ``meta`` gate (DESIGN.md, "Meta gate"): bilevel per-unit loss mixing.

* :mod:`.params` -- weight parameterisations (AMAL table, Meta-Weight-Net)
* :mod:`.lookahead` -- one-step look-ahead backends (``func``, ``higher``, ``closed-form``)
* :mod:`.analytic` -- the look-ahead over linear layers written out by hand (the gate's fast path)
* :mod:`.schedule` -- when to update (every N steps, AMAL preset)
* :mod:`.gate` -- the :class:`MetaGate` plugged into the shared trainer
"""

from metagate.gates.meta.gate import MetaGate

__all__ = ["MetaGate"]
