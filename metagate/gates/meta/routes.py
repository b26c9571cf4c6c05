"""Which route computes the meta gate's hypergradient: decided once at setup from the student and the options.

One strategy class per route, on the common base :class:`.route.Route` (``step(view, x, lr)``):

* :class:`.linear_route.LinearRoute` (``linear``) -- by hand over linear layers: a plain ReLU MLP's, or the head of
  a feature-protocol student (the closed form, and ``func`` over the head); AMAL's full pass
* :class:`.jvp_route.JvpRoute` (``jvp-by-hand``, ``jvp-forward-mode``, ``jvp-difference``) -- forward mode for
  students with batch norm
* :class:`.autograd_route.AutogradRoute` (``autograd``: ``func``'s double backward) and
  :class:`.autograd_route.HigherRoute` (``higher``) -- the references
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from metagate.errors import ConfigError
from metagate.gates.meta.autograd_route import AutogradRoute, HigherRoute
from metagate.gates.meta.config import MetaConfig
from metagate.gates.meta.jvp_route import JvpRoute
from metagate.gates.meta.learner import WeightLearner
from metagate.gates.meta.linear_route import LinearRoute, linear_layers, stepped_layers
from metagate.gates.meta.linearize import Linearization, linear_chain
from metagate.gates.meta.lookahead import check_feature_protocol
from metagate.gates.meta.route import Route
from metagate.gates.meta.sampler import ValSampler

#: every route's short name
ROUTES = ("linear", "jvp-by-hand", "jvp-forward-mode", "jvp-difference", "autograd", "higher")


def has_batch_norm(student: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules())


def choose_route(student: nn.Module, config: MetaConfig, names: Sequence[str]) -> tuple[str, str]:
    """The route of the look-ahead over ``names`` and why it was chosen.

    Every route computes the same hypergradient (tested against each other); they differ in cost. With batch norm
    the double backward of the ``create_graph`` look-ahead is costly (many elementwise ops on the activations), so
    the ``func`` backend takes forward mode; without it (plain MLPs) the double backward is the cheaper one, and the
    hand-written look-ahead cheaper still.

    :param names: the parameters of the virtual step (:func:`.lookahead.resolve_names`)
    :return: ``(route, reason)``, ``route`` one of :data:`ROUTES`
    :raises ConfigError: the closed-form backend with a student without the feature protocol
    """
    backend, product, kind = config.backend, config.meta_product, type(student).__name__
    if backend == "closed-form":
        check_feature_protocol(student)
        if linear_layers(student, names) is None:  # a seq2seq student: its head is `out`, its units tokens
            raise ConfigError(f"the closed-form meta backend looks ahead over a unit student's `head` (metagate.models "
                              f"MLP/CNN); {kind} is not one (use --meta-backend func)")
    if backend == "higher":
        return "higher", "--meta-backend higher: the reference look-ahead through higher.innerloop_ctx"
    batch_norm = has_batch_norm(student)
    if backend == "func" and config.meta_no_reuse:  # the reference path, with a forward of its own
        if batch_norm:
            return _jvp(product), f"--meta-no-reuse, {kind} has batch norm: forward-mode look-ahead ({product} " \
                                  "product) on a forward of its own"
        return "autograd", "--meta-no-reuse: func's double backward on a forward of its own"
    found = linear_layers(student, names)
    if found is not None:
        layers, is_mlp = found
        if is_mlp:
            low = stepped_layers(student, layers, names)[1]
            mods = {id(m): n for n, m in student.named_modules()}
            over = ", ".join(mods[id(lin)] for lin in layers[low:])
            return "linear", f"plain ReLU MLP: look-ahead by hand over layers {over} (no autograd)"
        what = "closed-form backend (AMAL)" if backend == "closed-form" else "look-ahead over the head alone"
        return "linear", f"{what}, {kind} has the feature protocol: look-ahead by hand over the head"
    if not batch_norm:
        return "autograd", f"{kind} is not a plain ReLU metagate.models.MLP, has no batch norm and the look-ahead " \
                           "is not over its head alone: autograd route (func's double backward)"
    if product == "difference":
        return "jvp-difference", f"{kind} has batch norm, --meta-product difference: forward-mode look-ahead, " \
                                 "J v by a central difference of two forwards"
    chain = linear_chain(student)
    if Linearization.covers(chain, names):
        return "jvp-by-hand", f"{kind} has batch norm and is a chain of modules with tangent rules: forward-mode " \
                              "look-ahead, J v by hand from the real forward's activations"
    why = "is not a metagate.models.MLP/CNN built from supported modules" if chain is None \
        else "moves parameters of modules without a tangent rule"
    return "jvp-forward-mode", f"{kind} has batch norm but {why}: forward-mode look-ahead, J v by forward-mode AD"


def _jvp(product: str) -> str:
    return "jvp-difference" if product == "difference" else "jvp-forward-mode"


def build_route(route: str, student: nn.Module, names: Sequence[str], learner: WeightLearner, sampler: ValSampler,
                config: MetaConfig) -> Route:
    """The :class:`.route.Route` named ``route`` (one of :data:`ROUTES`).

    :raises ConfigError: an unknown name, or a route that cannot serve this student and ``names``
    """
    kind = type(student).__name__
    args = (student, names, learner, sampler, config)
    if route == "linear":
        if linear_layers(student, names) is None:
            raise ConfigError(f"meta route 'linear' needs a plain ReLU metagate.models.MLP or a look-ahead over the "
                              f"head of a feature-protocol student; {kind} over {', '.join(names)} is neither")
        return LinearRoute(*args)
    if route == "jvp-by-hand":
        if not Linearization.covers(linear_chain(student), names):
            raise ConfigError(f"meta route 'jvp-by-hand' needs a metagate.models.MLP/CNN built from supported "
                              f"modules that holds every moved parameter; {kind} over {', '.join(names)} is not")
        if config.meta_no_reuse:
            raise ConfigError("meta route 'jvp-by-hand' reads the real forward's activations; drop --meta-no-reuse")
        return JvpRoute(*args, product="forward", by_hand=True)
    if route in ("jvp-forward-mode", "jvp-difference"):
        return JvpRoute(*args, product="difference" if route == "jvp-difference" else "forward")
    if route == "autograd":
        return AutogradRoute(*args)
    if route == "higher":
        return HigherRoute(*args)
    raise ConfigError(f"unknown meta route {route!r}; routes are {', '.join(ROUTES)}")
