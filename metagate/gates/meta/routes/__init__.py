"""How the meta gate computes its hypergradient, one strategy per route (chosen once at setup).

* :mod:`.base` -- :class:`Route`, the common base (``step(view, x, lr)``)
* :mod:`.linear` -- :class:`LinearRoute`: by hand over linear layers (a plain ReLU MLP's, or the head: closed form)
* :mod:`.jvp` -- :class:`JvpRoute`: forward mode for students with batch norm (``J v`` by hand, by forward-mode
  AD or by a central difference)
* :mod:`.autograd` -- :class:`AutogradRoute` (``func``'s double backward) and :class:`HigherRoute`
* :mod:`.choose` -- :func:`choose_route` and :func:`build_route`
"""

from metagate.gates.meta.routes.autograd import AutogradRoute, HigherRoute
from metagate.gates.meta.routes.base import LogitGrads, Route
from metagate.gates.meta.routes.choose import ROUTES, build_route, choose_route
from metagate.gates.meta.routes.jvp import JvpRoute
from metagate.gates.meta.routes.linear import LinearRoute

__all__ = ["ROUTES", "AutogradRoute", "HigherRoute", "JvpRoute", "LinearRoute", "LogitGrads", "Route",
           "build_route", "choose_route"]
