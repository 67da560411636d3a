"""TRL's ``DPOTrainer``, ``GRPOTrainer`` and ``SFTTrainer`` on fastpref's fused log-probs, switched on in one line.

::

    import fastpref.integrations.trl as fastpref_trl

    fastpref_trl.patch()                 # before the trainer is built; or: with fastpref_trl.patch(): ...
    trainer = trl.DPOTrainer(...)        # the TRL script, unchanged

Importing this module changes nothing in TRL; it only registers ``attn_implementation="fastpref"`` with
transformers (:func:`fastpref.attention.hf.register_hf_attention`), so a TRL script can load its model with
``model_init_kwargs={"attn_implementation": "fastpref"}``.

What TRL does (read from TRL 1.16's source, ``trl/trainer/utils.py`` and ``trl/kernels/chunked_logprob.py``): each
of the three trainers calls ``add_fused_lm_head(model, temperature, cast_lm_head_to_fp32, outputs)`` in its
``__init__`` (and on its reference model). The forward it installs answers ``model(..., labels=...,
fused_lm_head=True)`` by running the backbone and then ``_ChunkedLogProbFunction.apply(hidden, W, b, labels,
temperature, chunk_size, final_logit_softcapping, logit_scale, outputs)`` -- logits in ``[4096, 32768]`` tiles --
and returns per-token ``log_probs`` plus what the trainer asked for: ``entropy`` (all three: the metric; GRPO's
entropy mask), ``mean_logits`` (DPO's ``logits/chosen|rejected``), ``is_top1`` (SFT's and DPO's
``mean_token_accuracy``) and ``log_sum_sq_probs`` (DPO's WPO weights, ``use_weighting=True``).

What :func:`patch` replaces (module attributes, as Liger's ``apply_liger_kernel_to_*`` swap
``modeling_llama`` attributes; :func:`unpatch` puts TRL's back):

* ``add_fused_lm_head`` as the DPO, GRPO and SFT trainer modules see it: TRL's own runs, then the model is marked
  with its :class:`~fastpref.train.modeling.LogitTransform` (``logit_transform(model)``: softcap / logit scale);
* ``trl.trainer.utils._ChunkedLogProbFunction``: for a marked model, :func:`token_stats` computes every output
  from the hidden states and the LM head through ``fastpref.ops.linear_logprobs`` (log-probs and entropy, with
  gradients; on CUDA a fused Triton forward that forms no logits at all, and a backward that recomputes one
  ``[rows, V]`` tile at a time); ``mean_logits`` analytically, ``mean_v z_v = (h . mean_v W_v + mean_v b_v) *
  logit_scale / T``, without logits (softcapped models: in the tile pass below); ``is_top1`` and
  ``log_sum_sq_probs`` in one extra no-grad pass over ``[rows, V]`` tiles of the same size budget -- they need
  each row's maximum / ``sum p^2``, which the log-prob kernels do not keep (one more ``N x H x V`` matmul when
  a trainer asks for them: SFT and DPO, for their metrics).

Falls back to TRL's own path, for that call:

* callers other than the three trainers (KTO, RLOO, ...), and trainers built before :func:`patch`;
* models whose logits fastpref does not reproduce (``logit_transform`` raises: e.g. a head that slices the
  vocabulary); said once as a warning;
* DeepSpeed ZeRO-3, where TRL's backward gathers the partitioned LM head again and fastpref's op does not;
* TRL's own full-logits forwards, which this never touches: SFT's ``compute_loss_func`` and label smoothing,
  ``return_outputs=True`` / ``compute_metrics`` / ``preprocess_logits_for_metrics`` (TRL re-runs the model's
  plain forward for those).

Where TRL's reading of the config and fastpref's family table disagree on softcap / logit scale, fastpref's is
used (it is the model's own ``forward``) and the difference is said once. Padding-free: TRL 1.16 supports it in
``SFTTrainer`` only (``padding_free=True``, or BFD packing); its collator passes ``position_ids`` and
``cu_seq_lens_q`` / ``max_length_q``, which the ``"fastpref"`` attention reads directly (no host sync). TRL 1.16's
DPO turns ``padding_free`` off and GRPO has none; with padded batches the ``"fastpref"`` attention runs SDPA.

Tested with the TRL versions in :data:`TESTED_TRL` (tests/test_trl_integration.py, docs/trl.md); :func:`patch`
refuses other versions in one line unless ``allow_untested=True``.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import logging
import math
import types

import torch

from fastpref.attention.hf import register_hf_attention
from fastpref.ops import default_chunk_rows, linear_logprobs
from fastpref.train.config import ConfigError
from fastpref.train.modeling import LogitTransform, logit_transform

log = logging.getLogger("fastpref.integrations.trl")

TESTED_TRL = ">=1.16.0,<1.17"
"""The TRL versions this integration is tested with (a PEP 440 specifier)."""
TRAINER_MODULES = ("trl.trainer.dpo_trainer", "trl.trainer.grpo_trainer", "trl.trainer.sft_trainer")
"""The modules whose trainers :func:`patch` switches to fastpref."""
OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
"""The per-token fields of TRL's ``FusedCausalLMOutput``, in the order ``_ChunkedLogProbFunction`` returns them."""

_UTILS, _FN, _ADD = "trl.trainer.utils", "_ChunkedLogProbFunction", "add_fused_lm_head"

ATTN_IMPLEMENTATION = register_hf_attention()
"""``"fastpref"``: registered with transformers on import."""

_state: dict = {"saved": [], "impl": "auto"}
_transform: contextvars.ContextVar[LogitTransform | None] = contextvars.ContextVar("fastpref_trl", default=None)
_said: set[str] = set()


class Patched:
    """What :func:`patch` returns; as a context manager it calls :func:`unpatch` on exit."""

    def __enter__(self) -> Patched:
        return self

    def __exit__(self, *exc) -> None:
        unpatch()

    @property
    def active(self) -> bool:
        return is_patched()


def is_patched() -> bool:
    """Whether TRL currently runs on fastpref (:func:`patch` called, :func:`unpatch` not since)."""
    return bool(_state["saved"])


def patch(*, impl: str = "auto", allow_untested: bool = False) -> Patched:
    """Make TRL's DPO, GRPO and SFT trainers built from now on compute their per-token log-probs (and entropy,
    mean logits, top-1 accuracy, ``log sum p^2``) with fastpref's fused ops (module docstring). Idempotent.

    ``impl``: ``"auto"`` (Triton on CUDA, the PyTorch twin elsewhere), ``"triton"`` or ``"torch"``, passed to
    ``fastpref.ops.linear_logprobs``. ``allow_untested``: patch a TRL outside :data:`TESTED_TRL` anyway (the
    attributes patched must still exist). Returns a :class:`Patched` handle (``with patch(): ...``).
    """
    from fastpref._impl import IMPLS

    if impl not in IMPLS:
        raise ValueError(f"fastpref.integrations.trl.patch: impl must be one of {IMPLS}, got {impl!r}")
    _state["impl"] = impl
    if is_patched():
        return Patched()
    try:
        import trl
    except ImportError as e:
        raise RuntimeError(f"fastpref.integrations.trl: TRL is not importable ({e}); pip install 'trl{TESTED_TRL}'"
                           ) from None
    _check_version(getattr(trl, "__version__", "unknown"), allow_untested)
    utils = importlib.import_module(_UTILS)
    modules = [importlib.import_module(m) for m in TRAINER_MODULES]
    targets = [(utils, _FN), (utils, _ADD)] + [(m, _ADD) for m in modules]
    missing = [f"{m.__name__}.{a}" for m, a in targets if not hasattr(m, a)]
    if missing:
        raise RuntimeError(f"fastpref.integrations.trl: TRL {trl.__version__} has no {', '.join(missing)}; this "
                           f"integration follows TRL {TESTED_TRL}")
    trl_fn = getattr(utils, _FN)
    saved = [(utils, _FN, trl_fn)] + [(m, _ADD, getattr(m, _ADD)) for m in modules]
    setattr(utils, _FN, _LogProbFunction(trl_fn))
    for m in modules:
        trl_add = getattr(m, _ADD)
        setattr(m, _ADD, functools.wraps(trl_add)(functools.partial(_add_fused_lm_head, trl_add)))
    _state["saved"] = saved
    return Patched()


def unpatch() -> None:
    """Put TRL's own functions back (idempotent). Trainers built while patched then run TRL's path again."""
    for module, name, original in reversed(_state["saved"]):
        setattr(module, name, original)
    _state["saved"] = []


def _check_version(version: str, allow_untested: bool) -> None:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        tested = Version(version) in SpecifierSet(TESTED_TRL)
    except InvalidVersion:
        tested = False
    if not tested and not allow_untested:
        raise RuntimeError(f"fastpref.integrations.trl: tested with trl{TESTED_TRL}, found trl {version}; install a "
                           "tested version or call patch(allow_untested=True)")


def _say_once(msg: str) -> None:
    if msg not in _said:
        _said.add(msg)
        log.warning("%s", msg)


def _add_fused_lm_head(trl_add, model, *args, **kwargs):
    """TRL's ``add_fused_lm_head``, then mark ``model`` with its logit transform (read by ``_LogProbFunction``)."""
    trl_add(model, *args, **kwargs)
    try:
        transform = logit_transform(model)
    except ConfigError as e:
        _say_once(f"fastpref.integrations.trl: {e}; TRL's own log-prob path is used for this model")
        return
    _mark(model, transform)


def _mark(model, transform: LogitTransform) -> None:
    """Wrap the fused forward TRL installed so that its ``fused_lm_head=True`` calls see ``transform``.

    Bound like TRL's (``types.MethodType``, signature of the class's ``forward``: ``generate`` validates kwargs
    against it), with the inner forward and the transform stored on the model, so a deep copy of the model calls
    its own copy."""

    @functools.wraps(type(model).forward)
    def forward(self, *args, **kwargs):
        if not kwargs.get("fused_lm_head"):
            return self._fastpref_trl_forward(*args, **kwargs)
        token = _transform.set(self._fastpref_trl_transform)
        try:
            return self._fastpref_trl_forward(*args, **kwargs)
        finally:
            _transform.reset(token)

    model._fastpref_trl_forward = model.forward
    model._fastpref_trl_transform = transform
    model.forward = types.MethodType(forward, model)


class _LogProbFunction:
    """Stand-in for TRL's ``_ChunkedLogProbFunction``: the same ``apply`` arguments and outputs; fastpref's
    :func:`token_stats` inside a marked model's forward, TRL's function anywhere else and under DeepSpeed ZeRO-3
    (TRL's backward gathers the partitioned head again, ``maybe_gather_lm_head_ctx``; fastpref's op does not)."""

    def __init__(self, trl_fn):
        self.trl_fn = trl_fn

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=OUTPUTS[1:]):
        transform = _transform.get()
        if transform is None or _zero3():
            return self.trl_fn.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                     final_logit_softcapping, logit_scale, outputs)
        _compare(transform, final_logit_softcapping, logit_scale)
        return token_stats(hidden, weight, targets, bias=bias, temperature=temperature, transform=transform,
                           outputs=tuple(dict.fromkeys(("log_probs", *outputs))), impl=_state["impl"])


def _zero3() -> bool:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def _compare(ours: LogitTransform, softcap, logit_scale) -> None:
    theirs = LogitTransform(softcap=softcap, logit_scale=1.0 if logit_scale is None else float(logit_scale))

    def same(a, b):
        return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9))

    if not (same(ours.softcap, theirs.softcap) and same(ours.logit_scale, theirs.logit_scale)):
        _say_once(f"fastpref.integrations.trl: TRL reads {theirs} from the model config, fastpref's family table "
                  f"{ours}; using fastpref's (the model's own forward), so losses differ from TRL's own path")


def token_stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                bias: torch.Tensor | None = None, temperature: float = 1.0,
                transform: LogitTransform = LogitTransform(), outputs: tuple[str, ...] = ("log_probs",),
                impl: str = "auto") -> tuple[torch.Tensor | None, ...]:
    """TRL's per-token outputs of ``softmax(z / temperature)``, ``z`` the model's final logits of ``hidden [N, H]``
    under the LM head ``weight [V, H]`` (+ ``bias``) and ``transform``, never all ``[N, V]`` at once.

    Returns ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)`` (:data:`OUTPUTS`; ``None`` where not
    in ``outputs``), as TRL's ``ChunkedLogProbFunction``: ``log_probs`` and ``entropy`` fp32 and differentiable
    (``fastpref.ops.linear_logprobs``), the rest without gradient; ``is_top1`` is True where the target is the
    first maximum of ``z`` (``argmax``, as TRL's). ``targets`` must be ids in ``[0, V)`` (TRL clamps ignored
    labels to 0 and zeroes those positions afterwards); they are not checked (no host sync).
    """
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown:
        raise ValueError(f"token_stats: unknown outputs {unknown}; expected a subset of {OUTPUTS}")
    want_entropy = "entropy" in outputs
    out = linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, return_entropy=want_entropy,
                          impl=impl, check_targets=False, **transform.kwargs())
    logp, entropy = out if want_entropy else (out, None)
    return (logp, entropy, *_metric_stats(hidden, weight, bias, targets, temperature, transform, outputs))


@torch.no_grad()
def _metric_stats(hidden, weight, bias, targets, temperature, transform, outputs):
    """``(log_sum_sq_probs, mean_logits, is_top1)`` (each None unless asked): metrics TRL reads without gradient."""
    need = {o for o in ("log_sum_sq_probs", "mean_logits", "is_top1") if o in outputs}
    lss = mean = top1 = None
    if "mean_logits" in need and transform.softcap is None:
        # z is linear in h: mean_v z_v = (h . mean_v W_v + mean_v b_v) * logit_scale / T, no logits needed (in
        # fp32 also under autocast: a metric, and cheap)
        with torch.autocast(hidden.device.type, enabled=False):
            mean = hidden.float() @ weight.mean(0, dtype=torch.float32)
        if bias is not None:
            mean += bias.mean(dtype=torch.float32)
        mean *= transform.logit_scale / temperature
        need.discard("mean_logits")
    if not need:
        return lss, mean, top1
    h, w, b = _matmul_dtype(hidden, weight, bias)
    n = h.shape[0]
    if "is_top1" in need:
        top1 = torch.empty(n, dtype=torch.bool, device=h.device)
    if "log_sum_sq_probs" in need:
        lss = torch.empty(n, dtype=torch.float32, device=h.device)
    if "mean_logits" in need:
        mean = torch.empty(n, dtype=torch.float32, device=h.device)
    rows = default_chunk_rows(w.shape[0], max(n, 1), h.device)  # the ops' tile budget
    for s in range(0, n, rows):
        e = min(s + rows, n)
        z = _final_logits(h[s:e], w, b, transform, temperature)
        if top1 is not None:
            top1[s:e] = z.argmax(-1) == targets[s:e]
        if "mean_logits" in need:
            mean[s:e] = z.mean(-1)
        if lss is not None:
            lss[s:e] = torch.logsumexp(2.0 * z, -1) - 2.0 * torch.logsumexp(z, -1)
        del z
    return lss, mean, top1


def _matmul_dtype(hidden, weight, bias):
    """The operands of the LM-head matmul: as given inside autocast (the matmul casts them, as the model's own
    ``lm_head`` would), else cast to their promoted dtype (``torch.promote_types``)."""
    if torch.is_autocast_enabled(hidden.device.type):
        return hidden, weight, bias
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _final_logits(h, w, b, transform: LogitTransform, temperature: float) -> torch.Tensor:
    """fp32 ``z / T`` of one tile, in fastpref.ops' order: ``* logit_scale``, then the softcap, then ``/ T``."""
    z = (torch.addmm(b, h, w.t()) if b is not None else h @ w.t()).float()
    if transform.logit_scale != 1.0:
        z = z * transform.logit_scale
    if transform.softcap is not None:
        z = torch.tanh(z / transform.softcap) * transform.softcap
    return z / temperature if temperature != 1.0 else z
