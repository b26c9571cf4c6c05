"""The ``meta`` gate (docs/design.md, "Layout": `metagate/gates/meta/`): bilevel per-unit loss mixing.

* :mod:`.config` -- the options (:class:`MetaConfig`)
* :mod:`.params` -- weight parameterisations (AMAL table, Meta-Weight-Net)
* :mod:`.learner` -- the learned weights and their meta update
* :mod:`.sampler` -- the validation batches from the ``meta`` split
* :mod:`.lookahead` -- one-step look-ahead backends as pure functions (``func``, ``higher``, ``closed-form``)
* :mod:`.analytic` -- the look-ahead over linear layers written out by hand
* :mod:`.linearize`, :mod:`.capture` -- ``J v`` by hand from the real forward's activations, and the hooks
* :mod:`.routes` -- which route computes the hypergradient, chosen once at setup (:func:`.routes.choose_route`);
  :mod:`.route` the strategies' base, :mod:`.linear_route`, :mod:`.jvp_route`, :mod:`.autograd_route` the strategies
* :mod:`.schedule` -- when to update (every N steps, AMAL preset)
* :mod:`.gate` -- the :class:`MetaGate` plugged into the shared trainer: the wiring of the above
"""

from metagate.gates.meta.gate import MetaGate

__all__ = ["MetaGate"]
