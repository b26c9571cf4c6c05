"""Building blocks shared by every policy: the teacher encoder, the action distributions and the
mapping from actions to gate weights.

Shapes: ``n`` batch of observations (vectorised envs; absent for a gate), ``B`` units,
``K`` teachers, ``F`` unit features (:data:`metagate.features.NUM_FEATURES`), ``H`` hidden width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagate.features import NUM_FEATURES

LOG_2PI = math.log(2 * math.pi)


class TeacherEncoder(nn.Module):
    """Permutation-equivariant encoder over teachers (a DeepSets layer).

    One MLP ``phi`` is shared by all teachers and units; each teacher's code is then combined with
    the mean code of all teachers of the same unit: ``h_k = rho([phi(x_k), mean_j phi(x_j)])``.
    Permuting the teachers permutes the output, and the same weights serve any ``K``.

    :param num_features: ``F``
    :param hidden: ``H``
    """

    def __init__(self, num_features: int = NUM_FEATURES, hidden: int = 16) -> None:
        super().__init__()
        self.num_features, self.hidden = int(num_features), int(hidden)
        # ReLU, not tanh: the policy acts on every training step, and tanh costs ~2x the time here
        self.phi = nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.rho = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        """:param x: ``[..., K, F]`` unit features. :return: ``[..., K, H]``."""
        if x.shape[-1] != self.num_features:
            raise ValueError(f"expected {self.num_features} features per teacher, got {x.shape[-1]}")
        e = self.phi(x)
        ctx = e.mean(-2, keepdim=True).expand_as(e)
        return self.rho(torch.cat([e, ctx], -1))


class TeacherLogitHead(nn.Module):
    """Encoder + a per-teacher linear head: features ``[..., K, F]`` -> teacher logits ``[..., K]``.

    :param bounded: squash the logits with ``tanh`` into ``[-1, 1]`` (the env's action box)
    :param centered: subtract each unit's mean over teachers before squashing. Softmax weights ignore a
        common shift, so without centering that direction random-walks under exploration noise until
        ``tanh`` saturates and the gradient vanishes.
    """

    def __init__(self, num_features: int = NUM_FEATURES, hidden: int = 16, bounded: bool = True,
                 centered: bool | None = None) -> None:
        super().__init__()
        self.encoder = TeacherEncoder(num_features, hidden)
        self.head = nn.Linear(hidden, 1)
        self.bounded = bounded
        self.centered = bounded if centered is None else centered
        nn.init.normal_(self.head.weight, std=0.01)  # start near equal weights (= the fixed gate)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.head(self.encoder(x)).squeeze(-1)
        if self.centered:
            out = out - out.mean(-1, keepdim=True)
        return torch.tanh(out) if self.bounded else out


class FrozenLogitHead:
    """Fast no-grad forward of a :class:`TeacherLogitHead` for acting (the policy's training uses the module).

    With ``K`` teachers the DeepSets encoder is one plain MLP on the units' flattened features
    ``[B, K*F]``: block-diagonal layers for the shared ``phi`` (``kron(I_K, W)``), ``kron(I_K, W_a) +
    kron(1/K, W_b)`` for ``rho`` on ``[phi(x_k), mean_j phi(x_j)]``, and the head with the centering
    folded in. Four matrix products instead of a dozen small ops and module calls. The matrices are
    rebuilt when a parameter changes (its version counter moves) or ``K`` changes.

    :param head: the module (shared, not copied)
    """

    def __init__(self, head: TeacherLogitHead) -> None:
        self.head = head
        self.params = list(head.parameters())
        self._key: tuple[int, ...] | None = None
        self._mats: list[tuple[Tensor, Tensor]] = []

    @torch.no_grad()
    def _build(self, k: int) -> None:
        enc, hd = self.head.encoder, self.head.head
        l1, l2, r = enc.phi[0], enc.phi[2], enc.rho[0]
        h = enc.hidden
        w = l1.weight
        eye = torch.eye(k, dtype=w.dtype, device=w.device)
        w_rho = torch.kron(eye, r.weight[:, :h]) + torch.kron(torch.full_like(eye, 1.0 / k), r.weight[:, h:])
        w_out, b_out = torch.kron(eye, hd.weight), hd.bias.repeat(k)
        if self.head.centered:  # subtracting the mean over teachers is linear: fold it into the head
            center = eye - 1.0 / k
            w_out, b_out = center @ w_out, center @ b_out
        # stored [out, in] and used transposed (as F.linear does): MKL is fastest that way for narrow outputs
        self._mats = [(l1.bias.repeat(k), torch.block_diag(*[w] * k).t()),
                      (l2.bias.repeat(k), torch.block_diag(*[l2.weight] * k).t()),
                      (r.bias.repeat(k), w_rho.t()),
                      (b_out, w_out.t())]

    def __call__(self, x: Tensor) -> Tensor:
        """:param x: ``[B, K, F]`` (no grad). :return: ``[B, K]`` -- the module's output up to float rounding."""
        b, k, f = x.shape
        key = (k, *(p._version for p in self.params))
        if key != self._key:
            self._build(k)
            self._key = key
        (b1, w1), (b2, w2), (b3, w3), (b4, w4) = self._mats
        z = torch.addmm(b1, x.reshape(b, k * f), w1).relu_()
        z = torch.addmm(b2, z, w2).relu_()
        z = torch.addmm(b3, z, w3).relu_()
        z = torch.addmm(b4, z, w4)
        return z.tanh_() if self.head.bounded else z


class TeacherGaussian:
    """Gaussian over per-unit teacher logits ``[n, B, K]`` with state-independent log-stds.

    ``a = mu + sigma_u * eta + sigma_t * eps`` where ``eta ~ N(0, I)`` is drawn per unit and teacher and
    ``eps ~ N(0, I)`` per teacher (shared by the ``B`` units of one observation). With
    ``sigma_t`` off (``None``) this is the plain diagonal Gaussian; with ``sigma_u`` off it is the
    shared-only limit, whose exploration does not average out over the units of a batch-level reward
    (the low-variance choice for in-loop REINFORCE). With both, each teacher column is
    ``N(mu, sigma_u^2 I + sigma_t^2 11^T)``, whose density has a closed form.

    :param mean: ``[n, B, K]`` (or ``[B, K]``)
    :param log_std_unit: scalar tensor or ``None`` (no per-unit term)
    :param log_std_teacher: scalar tensor or ``None`` (no shared term)
    """

    def __init__(self, mean: Tensor, log_std_unit: Tensor | None, log_std_teacher: Tensor | None = None) -> None:
        if log_std_unit is None and log_std_teacher is None:
            raise ValueError("TeacherGaussian needs a per-unit or a shared log-std")
        self.mean = mean
        self.var_u = torch.exp(2 * log_std_unit) if log_std_unit is not None else None
        self.var_t = torch.exp(2 * log_std_teacher) if log_std_teacher is not None else None

    @property
    def num_units(self) -> int:
        return int(self.mean.shape[-2])

    def units(self, start: int, stop: int) -> TeacherGaussian:
        """The distribution of units ``start:stop`` (same log-stds)."""
        sub = TeacherGaussian.__new__(TeacherGaussian)
        sub.mean, sub.var_u, sub.var_t = self.mean[..., start:stop, :], self.var_u, self.var_t
        return sub

    def sample(self, shared_noise: Tensor | None = None) -> Tensor:
        """Draw actions; ``shared_noise`` (``[..., 1, K]`` standard normal) fixes the per-teacher term,
        e.g. to hold it over a whole episode -- the episode's units are then one joint sample whose
        log-probability is that of the units concatenated along the unit axis."""
        with torch.no_grad():
            a = self.mean.clone()
            if self.var_u is not None:
                a = a + self.var_u.sqrt() * torch.randn_like(self.mean)
            if self.var_t is not None:
                if shared_noise is None:
                    shape = (*self.mean.shape[:-2], 1, self.mean.shape[-1])
                    shared_noise = torch.randn(shape, dtype=self.mean.dtype, device=self.mean.device)
                a = a + self.var_t.sqrt() * shared_noise
        return a

    def mode(self) -> Tensor:
        return self.mean

    def get_actions(self, deterministic: bool = False) -> Tensor:
        return self.mode() if deterministic else self.sample()

    def _logdet(self) -> Tensor:
        b = self.num_units
        if self.var_u is None:
            assert self.var_t is not None
            return torch.log(self.var_t)
        ld = b * torch.log(self.var_u)
        if self.var_t is not None:
            ld = ld + torch.log1p(b * self.var_t / self.var_u)
        return ld

    def log_prob(self, actions: Tensor) -> Tensor:
        """:param actions: same shape as the mean (or flattened ``[n, B*K]``). :return: ``[n]`` (or ``[]``).

        Shared-only: the density of the per-teacher offset ``mean_i (a_ik - mu_ik)`` (actions drawn by
        this distribution have no per-unit residual).
        """
        d = actions.reshape(self.mean.shape) - self.mean
        b = self.num_units
        if self.var_u is None:
            assert self.var_t is not None
            eps2 = d.mean(-2) ** 2 / self.var_t
            return (-0.5 * (eps2 + self._logdet() + LOG_2PI)).sum(-1)
        s2 = (d * d).sum(-2)  # [.., K]
        quad = s2
        if self.var_t is not None:
            s1 = d.sum(-2)
            quad = s2 - self.var_t / (self.var_u + b * self.var_t) * s1 * s1
        per_teacher = -0.5 * (quad / self.var_u + self._logdet() + b * LOG_2PI)
        return per_teacher.sum(-1)

    def unit_log_prob(self, actions: Tensor) -> Tensor:
        """Per-unit log-probabilities ``[..., B]`` (summed over teachers); only without the shared term, where
        the units are independent (their sum is :meth:`log_prob`)."""
        if self.var_t is not None or self.var_u is None:
            raise ValueError("per-unit log-probabilities need per-unit noise only (no shared term)")
        d = actions.reshape(self.mean.shape) - self.mean
        return (-0.5 * (d * d / self.var_u + torch.log(self.var_u) + LOG_2PI)).sum(-1)

    def entropy(self) -> Tensor:
        k = self.mean.shape[-1]
        dims = 1 if self.var_u is None else self.num_units
        h = 0.5 * k * (dims * (LOG_2PI + 1.0) + self._logdet())
        return h.expand(self.mean.shape[:-2])


def teacher_probs(logits: Tensor, temperature: float = 0.25) -> Tensor:
    """Actions (teacher logits in ``[-1, 1]``) -> per-unit teacher distribution ``softmax(a / T)``."""
    return F.softmax(logits / temperature, dim=-1)


def split_kd_share(label_weight: Tensor, teacher_probs: Tensor, kd_share: Tensor | None = None) -> Tensor:
    """Compose a label/KD split with a per-unit teacher distribution into gate weights.

    This is how the policy weights teachers *inside* a KD share decided by another gate (the fixed
    gate's ``alpha`` or a meta gate's learned split).

    :param label_weight: ``[N]`` (or scalar) weight of the label column
    :param teacher_probs: ``[N, K]`` rows summing to 1
    :param kd_share: ``[N]`` (or scalar) total teacher weight; default ``1 - label_weight``
    :return: ``W [N, 1+K] = [label_weight, kd_share * teacher_probs]``
    """
    n = teacher_probs.shape[0]
    lw = torch.as_tensor(label_weight, dtype=teacher_probs.dtype, device=teacher_probs.device).expand(n)
    kd = (1.0 - lw) if kd_share is None else torch.as_tensor(
        kd_share, dtype=teacher_probs.dtype, device=teacher_probs.device).expand(n)
    return torch.cat([lw.unsqueeze(1), kd.unsqueeze(1) * teacher_probs], 1)


def action_weights(action: Tensor, alpha: float, temperature: float, alpha_col: Tensor | None = None) -> Tensor:
    """Actions ``[N, K]`` -> ``W = [alpha, (1 - alpha) softmax(clip(a, -1, 1) / T)]``: :func:`split_kd_share` of
    :func:`teacher_probs` in a few ops, the one mapping shared by the env (training) and the policy gates
    (deployment).

    :param alpha_col: a cached ``[N, 1]`` column of ``alpha`` (else one is made)
    """
    probs = torch.softmax(action.clamp(-1.0, 1.0).mul_(1.0 / temperature), -1).mul_(1.0 - alpha)
    if alpha_col is None or alpha_col.shape[0] != action.shape[0]:
        alpha_col = torch.full((action.shape[0], 1), alpha, device=action.device, dtype=action.dtype)
    return torch.cat([alpha_col, probs], 1)


def selection_weights(selected: Tensor, alpha: float) -> Tensor:
    """Bernoulli selection ``[N, K]`` (0/1) -> ``W [N, 1+K]``.

    Selected teachers share ``1 - alpha`` equally; a unit with no teacher selected learns from its
    label alone (weight 1), as in reinforced teacher selection (Yuan et al. 2021).
    """
    sel = selected.to(torch.float32)
    count = sel.sum(-1, keepdim=True)
    any_sel = (count > 0).to(sel.dtype)
    kd = (1.0 - alpha) * sel / count.clamp_min(1.0)
    label = any_sel * alpha + (1 - any_sel) * 1.0
    return torch.cat([label, kd], 1)
