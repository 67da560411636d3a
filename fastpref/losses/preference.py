"""Offline preference objectives from per-sequence log-probabilities (the "plain" forms).

Every function takes per-sequence *summed* log-probs of the completion tokens (``[P]`` tensors, one entry per
pair or per example; any float dtype, computed in fp32 or above) and returns ``(loss, metrics)``:

* ``loss``: the mean over pairs/examples (``reduction="mean"``), their sum (``"sum"``) or the per-pair /
  per-example losses (``"none"``);
* ``metrics``: a dict of detached scalar tensors named as TRL names them (``rewards/chosen``,
  ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ...).
  Nothing inside calls ``.item()``: no host sync unless ``validate=True``.

``validate=True`` (the default) also checks that no input holds a NaN or an infinity: that is one host sync, so
the trainer's hot path passes ``validate=False`` (shape, dtype and option checks are free and always on).

Length-normalised losses (IPO, ``sigmoid_norm``, SimPO, ORPO, the IPO form of CPO) need the token counts of each
completion (``chosen_lengths``/``rejected_lengths``: the number of scored, non-ignored target tokens). The SFT/NLL
terms (DPO ``"sft"``, CPO, ORPO) follow TRL and average the NLL over all chosen tokens of the *batch*; their
per-pair value is ``-logp_w / mean_chosen_length`` so that the mean over pairs is that token mean. When the
function is called on a slice of the batch (the fused losses do, chunk by chunk) pass the batch-wide
``mean_chosen_length`` so the slices add up to the batch loss.

Papers: DPO (Rafailov et al. 2023, arXiv:2305.18290), cDPO (Mitchell 2023, "A note on DPO with noisy
preferences"), IPO (Azar et al. 2023, arXiv:2310.12036), EXO (Ji et al. 2024, arXiv:2402.00856), NCA (Chen et al.
2024, arXiv:2402.05369), Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409), BCO (Jung et al. 2024,
arXiv:2404.04656), SPPO (Wu et al. 2024, arXiv:2405.00675), AOT (Melnyk et al. 2024, arXiv:2406.05882), APO
(D'Oosterlinck et al. 2024, arXiv:2408.06266), DiscoPOP (Chris Lu et al. 2024, arXiv:2406.08414), RPO (Pang et al.
2024, arXiv:2404.19733), R-DPO (Park et al. 2024, arXiv:2403.19159), LD-DPO (Liu et al. 2024, arXiv:2409.06411),
SimPO (Meng et al. 2024, arXiv:2405.14734), CPO (Xu et al. 2024, arXiv:2401.08417), ORPO (Hong et al. 2024,
arXiv:2403.07691), KTO (Ethayarajh et al. 2024, arXiv:2402.01306), SPIN (Chen et al. 2024, arXiv:2401.01335),
reward models (Bradley & Terry 1952; Ouyang et al. 2022, arXiv:2203.02155). ``docs/preference_losses.md`` has
the table of formulas and the TRL comparison.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

class DPOPair:
    """What a DPO loss type's per-pair term is a function of (``[P]`` tensors, fp32 or fp64), built by
    :func:`dpo_loss` after LD-DPO's weighting, the f-divergence scores, R-DPO's and DPOP's terms.

    ``rho_w``, ``rho_l``: the log-ratios ``log pi - log pi_ref`` of the chosen / rejected responses; ``s_w``,
    ``s_l``: their f-DPO scores (``rho`` itself for reverse KL); ``logit``: the pair logit ``beta * (s_w - s_l)``
    (+ R-DPO, - DPOP); ``pc, pr, rc, rr``: the (LD-weighted) log-probs; ``sft_logps``: the unweighted policy
    chosen log-probs; ``eps``: ``label_smoothing``.
    """

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def smoothed(self, z: Tensor) -> Tensor:
        """The label-smoothed logistic loss ``-(1-eps) log sigmoid(z) - eps log sigmoid(-z)`` (cDPO)."""
        return -(1 - self.eps) * F.logsigmoid(z) - self.eps * F.logsigmoid(-z)

    def normalised(self) -> Tensor:
        """``s_w / |y_w| - s_l / |y_l|``: the per-token score difference of the length-normalised types."""
        return (self.s_w / self.chosen_lengths.to(self.s_w.dtype).clamp(min=1)
                - self.s_l / self.rejected_lengths.to(self.s_w.dtype).clamp(min=1))

    def mean_chosen_length(self) -> Tensor:
        """The batch's mean chosen length (the SFT term's token-mean normaliser)."""
        return _mean_chosen_length("dpo_loss", self.chosen_lengths, self.mean_len).to(self.sft_logps)


def _sigmoid(t: DPOPair) -> Tensor:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290); cDPO with label smoothing (Mitchell 2023)."""
    return t.smoothed(t.logit)


def _hinge(t: DPOPair) -> Tensor:
    """SLiC (Zhao et al. 2023, arXiv:2305.10425): ``max(0, 1 - logit)``."""
    return torch.relu(1 - t.logit)


def _ipo(t: DPOPair) -> Tensor:
    """IPO (Azar et al. 2023, arXiv:2310.12036): ``(Delta / |y| - 1 / (2 beta))^2``, per-token log-ratios."""
    return (t.normalised() - 1 / (2 * t.beta)) ** 2


def _exo_pair(t: DPOPair) -> Tensor:
    """EXO (Ji et al. 2024, arXiv:2402.00856), the pairwise form; needs ``0 < eps < 1``."""
    z, eps = t.logit, t.eps
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))


def _nca_pair(t: DPOPair) -> Tensor:
    """NCA (Chen et al. 2024, arXiv:2402.05369), the pairwise form."""
    b = t.beta
    return -F.logsigmoid(b * t.rho_w) - 0.5 * F.logsigmoid(-b * t.rho_w) - 0.5 * F.logsigmoid(-b * t.rho_l)


def _robust(t: DPOPair) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409): unbiased under label flips with probability eps."""
    z, eps = t.logit, t.eps
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def _bco_pair(t: DPOPair) -> Tensor:
    """BCO (Jung et al. 2024, arXiv:2404.04656), TRL's pairwise form without the running reward shift."""
    return -F.logsigmoid(t.beta * t.rho_w) - F.logsigmoid(-t.beta * t.rho_l)


def _sppo_hard(t: DPOPair) -> Tensor:
    """SPPO (Wu et al. 2024, arXiv:2405.00675) with hard labels."""
    return (t.rho_w - 0.5 / t.beta) ** 2 + (t.rho_l + 0.5 / t.beta) ** 2


def _aot(t: DPOPair) -> Tensor:
    """AOT (Melnyk et al. 2024, arXiv:2406.05882), paired: sorted policy ratios against sorted reference ratios."""
    return t.smoothed(t.beta * (torch.sort(t.pc - t.pr, dim=0)[0] - torch.sort(t.rc - t.rr, dim=0)[0]))


def _aot_unpaired(t: DPOPair) -> Tensor:
    """AOT, unpaired: sorted chosen log-ratios against sorted rejected ones."""
    return t.smoothed(t.beta * (torch.sort(t.rho_w, dim=0)[0] - torch.sort(t.rho_l, dim=0)[0]))


def _apo_zero(t: DPOPair) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266): chosen up, rejected down."""
    return 1 - torch.sigmoid(t.beta * t.rho_w) + torch.sigmoid(t.beta * t.rho_l)


def _apo_down(t: DPOPair) -> Tensor:
    """APO-down (D'Oosterlinck et al. 2024): both down, the rejected more."""
    return torch.sigmoid(t.beta * t.rho_w) + 1 - torch.sigmoid(t.beta * (t.rho_w - t.rho_l))


def _discopop(t: DPOPair) -> Tensor:
    """DiscoPOP (Chris Lu et al. 2024, arXiv:2406.08414): logistic / exponential blend, temperature ``tau``."""
    m = torch.sigmoid(t.logit / t.discopop_tau)
    return -F.logsigmoid(t.logit) * (1 - m) + torch.exp(-t.logit) * m


def _sigmoid_norm(t: DPOPair) -> Tensor:
    """The sigmoid loss on per-token (length-normalised) log-ratios, no smoothing (TRL's ``sigmoid_norm``)."""
    return -F.logsigmoid(t.beta * t.normalised())


def _sft(t: DPOPair) -> Tensor:
    """The NLL of the chosen response, token mean over the batch (RPO, Pang et al. 2024, arXiv:2404.19733)."""
    return -t.sft_logps / t.mean_chosen_length()


class DPOType(typing.NamedTuple):
    """One row of :data:`DPO_TYPES`: the per-pair term and what it is built on."""

    term: Callable[[DPOPair], Tensor]
    """``DPOPair -> [P]`` per-pair losses (a sorted order for the batch-coupled types)."""
    logit: bool = False
    """A function of the pair logit only: R-DPO's length term and DPOP's penalty go into it."""
    f_div: bool = False
    """Built on the chosen-rejected score difference: an f-divergence other than reverse KL is defined."""
    lengths: bool = False
    """Needs the token counts (length-normalised)."""
    coupled: bool = False
    """Its per-pair terms depend on the whole batch (it sorts across pairs)."""


DPO_TYPES: dict[str, DPOType] = {
    "sigmoid": DPOType(_sigmoid, logit=True, f_div=True),
    "hinge": DPOType(_hinge, logit=True, f_div=True),
    "ipo": DPOType(_ipo, f_div=True, lengths=True),
    "exo_pair": DPOType(_exo_pair, logit=True, f_div=True),
    "nca_pair": DPOType(_nca_pair),
    "robust": DPOType(_robust, logit=True, f_div=True),
    "bco_pair": DPOType(_bco_pair),
    "sppo_hard": DPOType(_sppo_hard),
    "aot": DPOType(_aot, coupled=True),
    "aot_unpaired": DPOType(_aot_unpaired, coupled=True),
    "apo_zero": DPOType(_apo_zero),
    "apo_down": DPOType(_apo_down),
    "discopop": DPOType(_discopop, logit=True, f_div=True),
    "sigmoid_norm": DPOType(_sigmoid_norm, f_div=True, lengths=True),
    "sft": DPOType(_sft, f_div=True),
}
"""The DPO loss types, TRL 1.16's names: one row each. A new DPO variant is one function of a
:class:`DPOPair` and one row here; :func:`check_dpo_options`, :func:`dpo_loss`, the fused loss and the ``dpo``
config section read this table."""

DPO_LOSS_TYPES = tuple(DPO_TYPES)
"""Every ``loss_type`` of TRL 1.16's ``DPOTrainer``, with TRL's names."""

BATCH_COUPLED_DPO_LOSS_TYPES = tuple(k for k, v in DPO_TYPES.items() if v.coupled)
"""Loss types whose per-pair terms depend on the whole batch (they sort the log-ratios across pairs)."""

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
_F_DIVERGENCE_TYPES = tuple(k for k, v in DPO_TYPES.items() if v.f_div)
_LOGIT_TYPES = tuple(k for k, v in DPO_TYPES.items() if v.logit)
"""Loss types that are a function of the pair logit ``beta * Delta`` (R-DPO's and DPOP's terms go into it)."""
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
REWARD_LOSS_TYPES = ("bradley_terry", "log_exp")
_REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------------------- helpers

def _check(op: str, validate: bool, named: dict[str, Tensor | None], *, same_shape: Sequence[str] = ()) -> None:
    """Types and shapes always; NaN/inf only when ``validate`` (one host sync for all inputs together)."""
    first = None
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if not (t.is_floating_point() or name.endswith("lengths") or name == "labels"):
            raise ValueError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{op}: {name} must be 1-D (one value per pair or example), got shape {tuple(t.shape)}")
        if name in same_shape:
            if first is None:
                first = (name, t.shape[0])
            elif t.shape[0] != first[1]:
                raise ValueError(f"{op}: batch size mismatch: {name} has {t.shape[0]} entries but {first[0]} has "
                                 f"{first[1]}")
    if validate:
        floats = [(n, t) for n, t in named.items() if t is not None and t.is_floating_point()]
        if floats:
            bad = torch.stack([~torch.isfinite(t).all() for _, t in floats])
            if bad.any():  # the one host sync of validate=True
                names = [n for (n, _), b in zip(floats, bad.tolist()) if b]
                raise ValueError(f"{op}: NaN or infinite values in {', '.join(names)} (validate=True checks the "
                                 "inputs; fix the log-probs upstream)")


def _check_option(op: str, name: str, value, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"{op}: unknown {name} {value!r}; valid values: {', '.join(map(repr, valid))}")


def _reduce(per: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per.mean()
    if reduction == "sum":
        return per.sum()
    return per


def _f32(t: Tensor | None) -> Tensor | None:
    """Compute in fp32 at least (fp64 inputs stay fp64)."""
    return None if t is None else (t if t.dtype == torch.float64 else t.float())


def _mean_chosen_length(op: str, chosen_lengths: Tensor | None, mean_chosen_length) -> Tensor:
    if mean_chosen_length is not None:
        return torch.as_tensor(mean_chosen_length, dtype=torch.float32)
    if chosen_lengths is None:
        raise ValueError(f"{op}: the SFT/NLL term needs chosen_lengths (token counts of the chosen completions) "
                         "or mean_chosen_length")
    return chosen_lengths.float().mean().clamp(min=1.0)


def _pair_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor, chosen_logps: Tensor,
                  rejected_logps: Tensor) -> dict[str, Tensor]:
    cr, rr = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/accuracies": (cr > rr).to(cr.dtype).mean(),
        "rewards/margins": (cr - rr).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-log 2`` (Maechler 2012)."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


# --------------------------------------------------------------------------------------------------- DPO family

class DPOOptionError(ValueError):
    """A bad :func:`dpo_loss` option; ``option`` names it (``loss_type``, ``label_smoothing``, ...)."""

    def __init__(self, option: str, msg: str):
        super().__init__(msg)
        self.option = option


def check_dpo_options(loss_type: str | Sequence[str] = "sigmoid", *, loss_weights: Sequence[float] | None = None,
                      beta: float = 0.1, label_smoothing: float = 0.0, rdpo_alpha: float = 0.0,
                      ld_alpha: float | None = None, discopop_tau: float = 0.05,
                      f_divergence_type: str = "reverse_kl", dpop_lambda: float = 0.0) -> tuple[list[str], list[float]]:
    """The one check of :func:`dpo_loss`'s options (types, weights and their combinations); plain Python, no tensor.

    Returns ``(loss types as a list, their weights)``. Raises :class:`DPOOptionError` naming the offending option
    (its ``option``), so that the config layer names its key (``dpo.loss_type``).
    :func:`dpo_loss`, :class:`~fastpref.losses.fused_preference.FusedLinearDPOLoss` and the trainer's ``dpo``
    section all call it.
    """
    def bad(option: str, msg: str):
        raise DPOOptionError(option, msg)

    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not types:
        bad("loss_type", f"loss_type must name at least one loss; valid values: {', '.join(DPO_LOSS_TYPES)}")
    for lt in types:
        if lt not in DPO_LOSS_TYPES:
            bad("loss_type", f"unknown loss_type {lt!r}; valid values: {', '.join(map(repr, DPO_LOSS_TYPES))}")
    weights = [1.0] * len(types) if loss_weights is None else [float(w) for w in loss_weights]
    if len(weights) != len(types):
        bad("loss_weights", f"loss_weights has {len(weights)} entries but loss_type has {len(types)} ({types}): "
                            "one weight per loss type")
    if f_divergence_type not in F_DIVERGENCES:
        bad("f_divergence_type", f"unknown f_divergence_type {f_divergence_type!r}; valid values: "
                                 f"{', '.join(map(repr, F_DIVERGENCES))}")
    if f_divergence_type != "reverse_kl" and not set(types) <= set(_F_DIVERGENCE_TYPES):
        bad("f_divergence_type", f"f_divergence_type={f_divergence_type!r} is only defined for the loss types "
                                 f"{_F_DIVERGENCE_TYPES} (it needs the chosen-rejected difference), got {types}")
    if not beta > 0:
        bad("beta", f"beta must be > 0, got {beta}")
    if "exo_pair" in types and not 0.0 < label_smoothing < 1.0:
        bad("label_smoothing", f"'exo_pair' needs 0 < label_smoothing < 1 (the paper uses 1e-3), got {label_smoothing}")
    if "robust" in types and not 0.0 <= label_smoothing < 0.5:
        bad("label_smoothing", f"'robust' needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    if not 0.0 <= label_smoothing <= 1.0:
        bad("label_smoothing", f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if rdpo_alpha and not set(types) <= set(_LOGIT_TYPES) | {"sft"}:
        bad("rdpo_alpha", f"rdpo_alpha applies to the logit-based loss types {_LOGIT_TYPES}, got {types}")
    if not dpop_lambda >= 0:
        bad("dpop_lambda", f"dpop_lambda must be >= 0, got {dpop_lambda}")
    if dpop_lambda and not set(types) <= set(_LOGIT_TYPES) | {"sft"}:
        bad("dpop_lambda", f"dpop_lambda applies to the logit-based loss types {_LOGIT_TYPES}, got {types}")
    if ld_alpha is not None and not 0.0 <= ld_alpha <= 1.0:
        bad("ld_alpha", f"ld_alpha must be in [0, 1], got {ld_alpha}")
    if "discopop" in types and not discopop_tau > 0:
        bad("discopop_tau", f"discopop_tau must be > 0, got {discopop_tau}")
    return types, weights


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, *, beta: float = 0.1, loss_type: str | Sequence[str] = "sigmoid",
             loss_weights: Sequence[float] | None = None, label_smoothing: float = 0.0,
             chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
             mean_chosen_length: float | Tensor | None = None, rdpo_alpha: float = 0.0,
             ld_alpha: float | None = None, tail_logps: Sequence[Tensor] | None = None,
             discopop_tau: float = 0.05, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
             dpop_lambda: float = 0.0, reduction: str = "mean", validate: bool = True) -> tuple[Tensor, dict]:
    r"""DPO and every loss type of TRL 1.16's ``DPOTrainer``, from per-sequence log-probs.

    With :math:`\rho_w = \log\pi(y_w) - \log\pi_{ref}(y_w)`, :math:`\rho_l` likewise, :math:`\Delta = \rho_w - \rho_l`
    and :math:`\varepsilon` = ``label_smoothing``, the per-pair losses are (TRL's names):

    ========== ===============================================================================================
    sigmoid    :math:`-(1-\varepsilon)\log\sigma(\beta\Delta) - \varepsilon\log\sigma(-\beta\Delta)` (DPO; cDPO
               with :math:`\varepsilon > 0`)
    hinge      :math:`\max(0, 1 - \beta\Delta)` (SLiC)
    ipo        :math:`(\Delta/|y| - 1/(2\beta))^2` with each :math:`\rho` divided by its token count (IPO)
    exo_pair   :math:`\sigma(\beta\Delta)(\log\sigma(\beta\Delta) - \log(1-\varepsilon)) +
               \sigma(-\beta\Delta)(\log\sigma(-\beta\Delta) - \log\varepsilon)` (EXO, needs
               :math:`\varepsilon > 0`)
    nca_pair   :math:`-\log\sigma(\beta\rho_w) - \tfrac12\log\sigma(-\beta\rho_w) - \tfrac12\log\sigma(-\beta\rho_l)`
    robust     :math:`[-(1-\varepsilon)\log\sigma(\beta\Delta) + \varepsilon\log\sigma(-\beta\Delta)]/(1-2\varepsilon)`
    bco_pair   :math:`-\log\sigma(\beta\rho_w) - \log\sigma(-\beta\rho_l)` (TRL's form, no running reward shift)
    sppo_hard  :math:`(\rho_w - 1/(2\beta))^2 + (\rho_l + 1/(2\beta))^2`
    aot        sigmoid (with :math:`\varepsilon`) on sorted(:math:`\log\pi_w-\log\pi_l`) - sorted(ref ratios)
    aot_unp.   sigmoid (with :math:`\varepsilon`) on sorted(:math:`\rho_w`) - sorted(:math:`\rho_l`)
    apo_zero   :math:`1 - \sigma(\beta\rho_w) + \sigma(\beta\rho_l)`
    apo_down   :math:`\sigma(\beta\rho_w) + 1 - \sigma(\beta\Delta)`
    discopop   :math:`(1-m)(-\log\sigma(\beta\Delta)) + m\,e^{-\beta\Delta}`, :math:`m=\sigma(\beta\Delta/\tau)`
    sig._norm  sigmoid of :math:`\beta(\rho_w/|y_w| - \rho_l/|y_l|)` (no smoothing)
    sft        NLL of the chosen tokens, averaged over all chosen tokens of the batch (RPO = sigmoid + sft)
    ========== ===============================================================================================

    f-DPO (Wang et al. 2023, arXiv:2309.16240; ``f_divergence_type``, TRL's names): the log-ratios inside
    :math:`\Delta` (and IPO's/``sigmoid_norm``'s averages) become :math:`f'` scores: ``forward_kl``
    :math:`1 - e^{-\rho}`, ``js_divergence`` :math:`\log 2 + \log\sigma(\rho)`, ``alpha_divergence``
    :math:`(e^{(\alpha-1)\rho} - 1)/(\alpha-1)` (exponent clamped at 80, as TRL); only for the types built on
    the chosen-rejected difference (sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft).
    Rewards metrics stay :math:`\beta\rho`.

    ``loss_type`` may be a list, combined as ``sum_k loss_weights[k] * mean(loss_k)`` (weights default to 1).

    Length control and DPOP:

    * R-DPO (``rdpo_alpha``): ``alpha * (|y_w| - |y_l|)`` is added to the pair logit ``beta * Delta`` inside the
      loss (Park et al. 2024, Eq. 9): a pair whose chosen answer is longer needs less likelihood margin, so length
      alone earns nothing. Allowed with the logit-based types (sigmoid, hinge, robust, exo_pair, discopop).
    * DPOP / DPO-Positive (``dpop_lambda`` = the paper's lambda; Pal et al. 2024, "Smaug", arXiv:2402.13228, Eq. 3):
      the pair logit becomes ``beta * (Delta - lambda * max(0, log pi_ref(y_w) - log pi(y_w)))``, i.e. a penalty
      once the chosen response's likelihood falls below the reference's (the "likelihood displacement" failure of
      plain DPO). Allowed with the logit-based types (sigmoid, hinge, robust, exo_pair, discopop); with LD-DPO the
      chosen log-ratio is the weighted one; with an f-divergence the penalty stays on the log-ratio itself. The
      reference implementation is the paper's Eq. 3 (the authors released no trainer code; TRL has no DPOP).
    * LD-DPO (``ld_alpha`` with ``tail_logps``): each sequence log-prob becomes
      ``shared + ld_alpha * tail``, where ``tail`` is the part of the sum over completion tokens past the shorter
      response's length (``min(|y_w|, |y_l|)``) and ``shared = logps - tail``. ``tail_logps`` =
      ``(policy_chosen, policy_rejected, ref_chosen, ref_rejected)`` tails, ``[P]`` each (the fused losses compute
      them from the per-token log-probs). As in TRL, the rewards/logps metrics use the weighted log-probs and the
      ``sft`` term the unweighted ones.

    Differences from TRL 1.16, on purpose:

    * ``label_smoothing`` also applies to ``sigmoid`` (conservative DPO, as in TRL before 1.0 and in the cDPO note);
      TRL 1.16 ignores it there. With the default ``0.0`` the two agree.
    * ``sft`` per pair is ``-logp_w / mean_chosen_length``; TRL broadcasts the batch token-mean. The mean over the
      batch is identical; per-pair values (``reduction="none"``) differ, and ours are separable over pairs.
    * Not implemented: WPO ``use_weighting`` (needs the per-token sum of squared probabilities).

    ``aot``/``aot_unpaired`` sort across the batch: their ``reduction="none"`` losses are in sorted order and the
    fused losses compute them on the recompute engine.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[P]`` summed log-probs.
        beta: the KL strength (IPO's tau for ``ipo``).
        chosen_lengths, rejected_lengths: ``[P]`` completion token counts (needed by ``ipo``, ``sigmoid_norm``,
            ``sft``, and ``rdpo_alpha``).
        mean_chosen_length: batch-wide mean of ``chosen_lengths`` for the ``sft`` term (default: from this call).
        dpop_lambda: DPOP's lambda (0: off).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (per-pair, ``[P]``).
        validate: check the inputs for NaN/inf (one host sync).

    The options are checked by :func:`check_dpo_options` (no host sync), the one check of them: the trainer runs it
    on the ``dpo`` config section before any model is built.

    Returns:
        ``(loss, metrics)``; metrics ``rewards/{chosen,rejected,accuracies,margins}``, ``logps/{chosen,rejected}``.
    """
    op = "dpo_loss"
    try:
        types, weights = check_dpo_options(loss_type, loss_weights=loss_weights, beta=beta,
                                           label_smoothing=label_smoothing, rdpo_alpha=rdpo_alpha, ld_alpha=ld_alpha,
                                           discopop_tau=discopop_tau, f_divergence_type=f_divergence_type,
                                           dpop_lambda=dpop_lambda)
    except DPOOptionError as e:
        raise DPOOptionError(e.option, f"{op}: {e}") from None
    _check_option(op, "reduction", reduction, _REDUCTIONS)
    needs_len = any(DPO_TYPES[t].lengths for t in types) or bool(rdpo_alpha)
    if needs_len and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"{op}: loss_type {types} with rdpo_alpha={rdpo_alpha} needs chosen_lengths and "
                         "rejected_lengths (completion token counts)")
    if ld_alpha is not None:
        if tail_logps is None or len(tail_logps) != 4:
            raise ValueError(f"{op}: ld_alpha needs tail_logps = (policy_chosen, policy_rejected, ref_chosen, "
                             "ref_rejected) log-prob sums past the shared length")
    named = {"policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps,
             "ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps,
             "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
    if ld_alpha is not None:
        named.update(zip(("tail_logps[0]", "tail_logps[1]", "tail_logps[2]", "tail_logps[3]"), tail_logps))
    _check(op, validate, named, same_shape=tuple(named))

    pc, pr, rc, rr = map(_f32, (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))
    sft_logps = pc
    if ld_alpha is not None:  # shared + alpha * tail = full - (1 - alpha) * tail
        k = 1.0 - ld_alpha
        tc, tr, trc, trr = map(_f32, tail_logps)
        pc, pr, rc, rr = pc - k * tc, pr - k * tr, rc - k * trc, rr - k * trr
    rho_w, rho_l = pc - rc, pr - rr
    s_w, s_l = _f_scores(rho_w, f_divergence_type, f_alpha_divergence_coef), _f_scores(rho_l, f_divergence_type,
                                                                                      f_alpha_divergence_coef)
    delta = s_w - s_l
    if dpop_lambda:  # DPOP: penalise a chosen log-prob below the reference's
        delta = delta - dpop_lambda * torch.relu(-rho_w)
    logit = beta * delta
    if rdpo_alpha:
        logit = logit + rdpo_alpha * (chosen_lengths.to(logit.dtype) - rejected_lengths.to(logit.dtype))
    pair = DPOPair(beta=beta, eps=label_smoothing, logit=logit, rho_w=rho_w, rho_l=rho_l, s_w=s_w, s_l=s_l, pc=pc,
                   pr=pr, rc=rc, rr=rr, sft_logps=sft_logps, chosen_lengths=chosen_lengths,
                   rejected_lengths=rejected_lengths, mean_len=mean_chosen_length, discopop_tau=discopop_tau)
    per = None
    for lt, wgt in zip(types, weights):
        loss = DPO_TYPES[lt].term(pair)
        per = wgt * loss if per is None else per + wgt * loss
    metrics = _pair_metrics(beta * rho_w, beta * rho_l, pc, pr)
    return _reduce(per, reduction), metrics


def _f_scores(rho: Tensor, kind: str, alpha: float) -> Tensor:
    """f'(ratio) of f-DPO, as a function of the log-ratio rho (reverse KL: rho itself)."""
    if kind == "forward_kl":
        return 1 - torch.exp(-rho)
    if kind == "js_divergence":
        return math.log(2.0) + F.logsigmoid(rho)
    if kind == "alpha_divergence" and abs(alpha - 1.0) >= 1e-6:
        return (torch.exp(((alpha - 1.0) * rho).clamp(max=80.0)) - 1.0) / (alpha - 1.0)
    return rho


def spin_loss(policy_real_logps: Tensor, policy_generated_logps: Tensor, ref_real_logps: Tensor,
              ref_generated_logps: Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid", **kwargs):
    r"""SPIN (Chen et al. 2024, arXiv:2401.01335): DPO with the gold (SFT) response as "chosen" and the previous
    iterate's own generation as "rejected"; the reference is the previous iterate.

    :math:`-\log\sigma(\beta[\log\frac{\pi(y)}{\pi_t(y)} - \log\frac{\pi(y')}{\pi_t(y')}])` with ``loss_type="sigmoid"``
    (the paper's logistic loss, :math:`\lambda` = ``beta``); ``"hinge"`` is the paper's other choice. All other
    keyword arguments go to :func:`dpo_loss`. TRL has no SPIN trainer; the SPIN authors' code is a DPO trainer on
    these pairs, which is what this is.
    """
    return dpo_loss(policy_real_logps, policy_generated_logps, ref_real_logps, ref_generated_logps, beta=beta,
                    loss_type=loss_type, **kwargs)


# --------------------------------------------------------------------------------------------------- KTO

def kto_loss(policy_logps: Tensor, ref_logps: Tensor, labels: Tensor | None = None, *, beta: float = 0.1,
             loss_type: str = "kto", desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             policy_kl_logps: Tensor | None = None, ref_kl_logps: Tensor | None = None,
             kl: Tensor | float | None = None,
             reduction: str = "mean", validate: bool = True) -> tuple[Tensor, dict]:
    r"""KTO (Ethayarajh et al. 2024, arXiv:2402.01306, Eq. 7), unpaired or paired.

    With :math:`\rho = \log\pi(y|x) - \log\pi_{ref}(y|x)` and the reference point :math:`z_0`::

        desirable:    w_D * (1 - sigmoid(beta * (rho - z0)))
        undesirable:  w_U * (1 - sigmoid(beta * (z0 - rho)))

    ``loss_type="apo_zero_unpaired"`` (APO, arXiv:2408.06266): ``1 - sigmoid(beta rho)`` / ``sigmoid(beta rho)``.

    :math:`z_0 = \max(0, \mathrm{mean}(\log\pi(y'|x) - \log\pi_{ref}(y'|x)))` over *mismatched* pairs (prompt
    ``x_i`` with the completion of another example, as TRL builds ``KL_input_ids``), detached: pass their
    log-probs as ``policy_kl_logps``/``ref_kl_logps``, or a precomputed ``kl``. Without either, ``z0 = 0``.

    Args:
        policy_logps, ref_logps: ``[B]`` summed completion log-probs.
        labels: ``[B]`` bool, True = desirable. ``None`` means paired data in TRL order: the first half of the batch
            are the chosen (desirable) completions, the second half the rejected ones of the same prompts.

    Returns ``(loss, metrics)``; ``loss`` is the mean over all examples (TRL's ``nanmean`` of the weighted losses),
    ``reduction="none"`` gives ``[B]`` in input order. Metrics: ``rewards/chosen``, ``rewards/rejected`` (means over
    the desirable / undesirable examples, 0 when there are none), ``rewards/margins``, ``logps/chosen``,
    ``logps/rejected``, ``kl``. Same as TRL 1.16's ``KTOTrainer`` loss.
    """
    op = "kto_loss"
    _check_option(op, "loss_type", loss_type, KTO_LOSS_TYPES)
    _check_option(op, "reduction", reduction, _REDUCTIONS)
    if not beta > 0:
        raise ValueError(f"{op}: beta must be > 0, got {beta}")
    if (policy_kl_logps is None) != (ref_kl_logps is None):
        raise ValueError(f"{op}: pass both policy_kl_logps and ref_kl_logps (mismatched-pair log-probs) or neither")
    _check(op, validate, {"policy_logps": policy_logps, "ref_logps": ref_logps, "labels": labels},
           same_shape=("policy_logps", "ref_logps", "labels"))
    _check(op, validate, {"policy_kl_logps": policy_kl_logps, "ref_kl_logps": ref_kl_logps},
           same_shape=("policy_kl_logps", "ref_kl_logps"))
    n = policy_logps.shape[0]
    if labels is None:
        if n % 2:
            raise ValueError(f"{op}: paired KTO (labels=None) needs an even batch [chosen..., rejected...], got {n}")
        labels = torch.arange(n, device=policy_logps.device) < n // 2
    labels = labels.bool()
    pl, rl = _f32(policy_logps), _f32(ref_logps)
    if kl is not None:
        z0 = torch.as_tensor(kl, dtype=pl.dtype, device=pl.device).detach()
    elif policy_kl_logps is not None:
        z0 = (_f32(policy_kl_logps) - _f32(ref_kl_logps)).mean().clamp(min=0).detach().to(pl.dtype)
    else:
        z0 = pl.new_zeros(())
    rho = pl - rl
    if loss_type == "kto":
        good, bad = 1 - torch.sigmoid(beta * (rho - z0)), 1 - torch.sigmoid(beta * (z0 - rho))
    else:
        good, bad = 1 - torch.sigmoid(beta * rho), torch.sigmoid(beta * rho)
    per = torch.where(labels, desirable_weight * good, undesirable_weight * bad)
    r = (beta * rho).detach()
    lab = labels.to(r.dtype)
    n_good, n_bad = lab.sum().clamp(min=1), (1 - lab).sum().clamp(min=1)
    metrics = {
        "rewards/chosen": (r * lab).sum() / n_good,
        "rewards/rejected": (r * (1 - lab)).sum() / n_bad,
        "logps/chosen": (pl.detach() * lab).sum() / n_good,
        "logps/rejected": (pl.detach() * (1 - lab)).sum() / n_bad,
        "kl": z0.detach(),
    }
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return _reduce(per, reduction), metrics


# --------------------------------------------------------------------------------------------------- CPO / SimPO / ORPO

def cpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, chosen_lengths: Tensor | None = None,
             rejected_lengths: Tensor | None = None, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, cpo_alpha: float = 1.0, simpo_gamma: float = 0.5, alpha: float = 0.0,
             mean_chosen_length: float | Tensor | None = None, reduction: str = "mean",
             validate: bool = True) -> tuple[Tensor, dict]:
    r"""CPO (Xu et al. 2024, arXiv:2401.08417): reference-free DPO plus a behaviour-cloning NLL on the chosen.

    With :math:`s = \log\pi(y_w) - \log\pi(y_l)` (sums for sigmoid/hinge; per-token averages for ipo/simpo, as TRL)::

        sigmoid  -(1-eps) log sigmoid(beta s) - eps log sigmoid(-beta s)
        hinge    relu(1 - beta s)
        ipo      (s - 1/(2 beta))^2
        simpo    sigmoid form on s - simpo_gamma / beta            (SimPO, see simpo_loss)
        + cpo_alpha * NLL(chosen)   (token mean over the batch's chosen tokens)

    AlphaPO (Gupta et al. 2025, arXiv:2501.03884; ``alpha != 0``): each (summed or averaged) log-prob ``l`` is
    replaced by the reward ``(1 - exp(-alpha l)) / alpha`` (= ``(1 - p^-alpha) / alpha``, -> ``l`` as alpha -> 0)
    before the loss; TRL's ``loss_type="alphapo"`` is ``simpo`` with ``cpo_alpha=0`` and this ``alpha``.

    Same as TRL 1.16's ``CPOTrainer.cpo_loss`` + ``cpo_alpha * nll`` (NLL on the completion tokens, as TRL's CPO).
    Metrics: ``rewards/*`` = ``beta * logps`` (AlphaPO: ``beta *`` the transformed rewards, as TRL), ``logps/*``,
    ``nll_loss``.
    """
    op = "cpo_loss"
    _check_option(op, "loss_type", loss_type, CPO_LOSS_TYPES)
    _check_option(op, "reduction", reduction, _REDUCTIONS)
    if not beta > 0:
        raise ValueError(f"{op}: beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"{op}: label_smoothing must be in [0, 0.5], got {label_smoothing}")
    averaged = loss_type in ("ipo", "simpo")
    if averaged and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"{op}: loss_type {loss_type!r} averages log-probs per token: pass chosen_lengths and "
                         "rejected_lengths")
    _check(op, validate, {"policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps,
                          "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths},
           same_shape=("policy_chosen_logps", "policy_rejected_logps", "chosen_lengths", "rejected_lengths"))
    pc, pr = _f32(policy_chosen_logps), _f32(policy_rejected_logps)
    if averaged:
        c, r = pc / chosen_lengths.to(pc.dtype).clamp(min=1), pr / rejected_lengths.to(pr.dtype).clamp(min=1)
    else:
        c, r = pc, pr
    if alpha:
        c_r, r_r = -torch.expm1(-alpha * c) / alpha, -torch.expm1(-alpha * r) / alpha
    else:
        c_r, r_r = c, r
    s = c_r - r_r
    eps = label_smoothing
    if loss_type in ("sigmoid", "simpo"):
        z = beta * s - (simpo_gamma if loss_type == "simpo" else 0.0)
        per = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    elif loss_type == "hinge":
        per = torch.relu(1 - beta * s)
    else:
        per = (s - 1 / (2 * beta)) ** 2
    nll = None
    if cpo_alpha:
        nll = -pc / _mean_chosen_length(op, chosen_lengths, mean_chosen_length).to(pc)
        per = per + cpo_alpha * nll
    metrics = _pair_metrics(beta * c_r, beta * r_r, c, r)
    metrics["nll_loss"] = nll.detach().mean() if nll is not None else pc.new_zeros(()).detach()
    return _reduce(per, reduction), metrics


def simpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, chosen_lengths: Tensor,
               rejected_lengths: Tensor, *, beta: float = 0.1, simpo_gamma: float = 0.5, label_smoothing: float = 0.0,
               alpha: float = 0.0, reduction: str = "mean", validate: bool = True) -> tuple[Tensor, dict]:
    r"""SimPO (Meng et al. 2024, arXiv:2405.14734, Eq. 6): reference-free, length-normalised, with a target margin.

    :math:`-\log\sigma(\frac{\beta}{|y_w|}\log\pi(y_w) - \frac{\beta}{|y_l|}\log\pi(y_l) - \gamma)` (with
    ``label_smoothing`` the conservative form). This is :func:`cpo_loss` with ``loss_type="simpo"`` and
    ``cpo_alpha=0``, exactly what TRL 1.16 runs for SimPO (``CPOTrainer``, ``loss_type="simpo"``, ``cpo_alpha=0``),
    with TRL's defaults ``beta=0.1``, ``simpo_gamma=0.5``; the paper tunes ``beta`` in 2..10 and ``gamma/beta``
    around 0.5. ``cpo_loss(loss_type="simpo", cpo_alpha>0)`` is CPO-SimPO; ``alpha != 0`` is AlphaPO.
    """
    return cpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, beta=beta,
                    loss_type="simpo", label_smoothing=label_smoothing, cpo_alpha=0.0, simpo_gamma=simpo_gamma,
                    alpha=alpha, reduction=reduction, validate=validate)


def orpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, chosen_lengths: Tensor,
              rejected_lengths: Tensor, *, beta: float = 0.1, mean_chosen_length: float | Tensor | None = None,
              reduction: str = "mean", validate: bool = True) -> tuple[Tensor, dict]:
    r"""ORPO (Hong et al. 2024, arXiv:2403.07691, Eqs. 4-7): NLL on the chosen plus a log-odds-ratio penalty.

    With per-token average log-probs :math:`a_w = \log\pi(y_w)/|y_w|`, :math:`a_l` likewise::

        log_odds = (a_w - a_l) - (log(1 - exp(a_w)) - log(1 - exp(a_l)))
        loss     = NLL(chosen) - beta * log sigmoid(log_odds)          (beta is the paper's lambda)

    The odds-ratio term is TRL 1.16's ``ORPOTrainer.odds_ratio_loss`` (same stable ``log1mexp``). The NLL is the
    token mean over the batch's scored chosen tokens (the completion), as in the paper's Eq. 6; TRL's ORPO also
    includes the prompt tokens in its NLL, a deliberate difference (pass prompt-including ``policy_chosen_logps``
    and lengths if you want TRL's variant for both terms). Metrics: ``rewards/*`` = ``beta * a``, ``logps/*`` = ``a``,
    ``log_odds_ratio`` (mean log sigmoid), ``log_odds_chosen``, ``nll_loss``.
    """
    op = "orpo_loss"
    _check_option(op, "reduction", reduction, _REDUCTIONS)
    if not beta >= 0:
        raise ValueError(f"{op}: beta must be >= 0, got {beta}")
    _check(op, validate, {"policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps,
                          "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths},
           same_shape=("policy_chosen_logps", "policy_rejected_logps", "chosen_lengths", "rejected_lengths"))
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError(f"{op}: needs chosen_lengths and rejected_lengths (completion token counts)")
    pc, pr = _f32(policy_chosen_logps), _f32(policy_rejected_logps)
    aw, al = pc / chosen_lengths.to(pc.dtype).clamp(min=1), pr / rejected_lengths.to(pr.dtype).clamp(min=1)
    log_odds = (aw - al) - (log1mexp(aw) - log1mexp(al))
    ratio = F.logsigmoid(log_odds)
    nll = -pc / _mean_chosen_length(op, chosen_lengths, mean_chosen_length).to(pc)
    per = nll - beta * ratio
    metrics = _pair_metrics(beta * aw, beta * al, aw, al)
    metrics.update({"log_odds_ratio": ratio.detach().mean(), "log_odds_chosen": log_odds.detach().mean(),
                    "nll_loss": nll.detach().mean()})
    return _reduce(per, reduction), metrics


# --------------------------------------------------------------------------------------------------- reward models

def reward_model_loss(rewards_chosen: Tensor, rewards_rejected: Tensor, *, margin: Tensor | None = None,
                      center_rewards_coefficient: float | None = None, loss_type: str = "bradley_terry",
                      reduction: str = "mean", validate: bool = True) -> tuple[Tensor, dict]:
    r"""Pairwise reward-model loss (Bradley-Terry; InstructGPT, arXiv:2203.02155, Eq. 1).

    ``bradley_terry``: :math:`-\log\sigma(r_c - r_r - m)` with an optional per-pair ``margin`` m (Llama 2's margin
    loss; TRL's ``RewardTrainer`` with a ``margin`` column), plus ``center_rewards_coefficient *
    mean((r_c + r_r)^2)`` (TRL's reward centring, Eisenstein et al. 2023) when given.

    ``log_exp``: ColossalChat's ``LogExpLoss``, :math:`\log(1 + e^{r_r - r_c})`. It is the same function:
    :math:`\log(1+e^{-x}) = \mathrm{softplus}(-x) = -\log\sigma(x)`; ColossalChat evaluates it literally, which
    overflows to ``inf`` in fp32 once :math:`r_r - r_c > 88`; here both names compute ``softplus(r_r - r_c + m)``.

    The rewards come from a value head, not the LM head, so there is no fused form. Metrics (TRL's names):
    ``accuracy``, ``margin``, ``rewards/chosen``, ``rewards/rejected``.
    """
    op = "reward_model_loss"
    _check_option(op, "loss_type", loss_type, REWARD_LOSS_TYPES)
    _check_option(op, "reduction", reduction, _REDUCTIONS)
    _check(op, validate, {"rewards_chosen": rewards_chosen, "rewards_rejected": rewards_rejected, "margin": margin},
           same_shape=("rewards_chosen", "rewards_rejected", "margin"))
    c, r = _f32(rewards_chosen), _f32(rewards_rejected)
    x = c - r - (_f32(margin) if margin is not None else 0.0)
    per = F.softplus(-x)
    if center_rewards_coefficient is not None:
        # Its batch mean is TRL's term; per pair it is the pair's share.
        per = per + center_rewards_coefficient * (c + r) ** 2
    d = (c - r).detach()
    metrics = {"accuracy": (d > 0).to(d.dtype).mean(), "margin": d.mean(), "rewards/chosen": c.detach().mean(),
               "rewards/rejected": r.detach().mean()}
    return _reduce(per, reduction), metrics
