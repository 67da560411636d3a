"""Layout guards (docs/architecture.md): the config imports only the algorithm registry, the registry imports no
algorithm or model code, and the reference modes are one class each behind one interface (fastpref.train.reference).
"""

import json
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch

from fastpref.train import reference as R


def _modules_after_import(module: str) -> set[str]:
    """The ``fastpref`` modules a fresh interpreter holds after ``import module``."""
    code = (f"import sys, json, {module}; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('fastpref'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_config_does_not_import_algorithms_or_modeling():
    mods = _modules_after_import("fastpref.train.config")
    assert "fastpref.train.config" in mods
    for heavy in ("fastpref.train.modeling", "fastpref.train.algorithms.base", "fastpref.train.algorithms"):
        assert heavy not in mods, f"importing fastpref.train.config imported {heavy}"


def test_registry_imports_nothing_of_fastpref():
    assert _modules_after_import("fastpref.train.registry") == {"fastpref", "fastpref.train",
                                                                "fastpref.train.registry"}


def test_registry_is_reexported_by_algorithms_base():
    from fastpref.train import registry
    from fastpref.train.algorithms import base

    assert base.ALGORITHMS is registry.ALGORITHMS
    assert base.register_algorithm is registry.register_algorithm
    assert base.load_builtin_algorithms is registry.load_builtin_algorithms
    registry.load_builtin_algorithms()
    assert {"sft", "dpo", "kto", "orpo", "simpo", "cpo", "rm", "grpo"} <= set(registry.ALGORITHMS)


class _Policy(torch.nn.Linear):
    """A stand-in policy with PEFT's ``disable_adapter()`` context manager (records whether it is active)."""

    def __init__(self):
        super().__init__(3, 2)
        self.adapters_off = False

    @contextmanager
    def disable_adapter(self):
        self.adapters_off = True
        try:
            yield
        finally:
            self.adapters_off = False


def test_factory_builds_one_class_per_mode():
    pol = _Policy()
    want = {"copy": (R.CopyReference, True, False), "lora_base": (R.LoraBaseReference, False, False),
            "precompute": (R.PrecomputeReference, False, True), "none": (R.NoReference, False, False)}
    for mode, (cls, needs_copy, precomputed) in want.items():
        ref = R.make_reference(mode, pol)
        assert type(ref) is cls and ref.mode == mode and isinstance(ref, R.ReferenceMode)
        assert (ref.needs_copy, ref.precomputed) == (needs_copy, precomputed)
        assert ref.state_dict() == {}   # nothing taken yet: a checkpoint holds no reference
    with pytest.raises(ValueError, match="reference.mode='auto': expected one of copy, lora_base, precompute, none"):
        R.make_reference("auto", pol)


def test_copy_take_refresh_and_checkpoint_round_trip():
    pol = _Policy()
    ref = R.make_reference("copy", pol)
    assert not ref.live
    with pytest.raises(RuntimeError, match="the copy has not been taken yet"), ref.network():
        pass
    with pytest.raises(ValueError, match=r"only a taken 'copy' reference can be refreshed \(mode=copy\)"):
        ref.refresh(pol)
    ref.take()
    assert ref.live and ref.model is not pol and not ref.model.training
    assert not any(p.requires_grad for p in ref.model.parameters())
    with torch.no_grad():
        pol.weight.add_(1.0)
    assert not torch.equal(ref.model.weight, pol.weight)       # a copy: the policy moves, the reference does not
    ref.refresh(pol)
    torch.testing.assert_close(ref.model.weight, pol.weight, rtol=0, atol=0)
    with ref.network() as net:
        assert net is ref.model
    state = ref.state_dict()
    assert list(state) == ["model"]                            # the checkpoint key the resume tests rely on
    other = R.make_reference("copy", _Policy())
    other.load_state_dict(state)                               # takes the copy first, then loads its weights
    torch.testing.assert_close(other.model.weight, pol.weight, rtol=0, atol=0)
    given = _Policy()
    ref.take(given)                                            # a frozen copy the parallel backend built
    assert ref.model is given


def test_lora_base_is_the_policy_with_adapters_off_in_eval():
    pol = _Policy().train()
    ref = R.make_reference("lora_base", pol)
    assert ref.live
    with ref.network() as net:
        assert net is pol and pol.adapters_off and not pol.training
    assert not pol.adapters_off and pol.training                # restored after the block
    ref.take()
    assert ref.model is None and ref.state_dict() == {}
    with pytest.raises(ValueError, match=r"can be refreshed \(mode=lora_base\)"):
        ref.refresh(pol)


def test_precompute_cache_lookup_and_checkpoint():
    pol = _Policy().train()
    ref = R.make_reference("precompute", pol)
    assert not ref.live
    with ref.network() as net:
        assert net is pol and not pol.training and not pol.adapters_off
    assert pol.training
    from fastpref.data.batch import Batch

    z = torch.zeros(4, 1, dtype=torch.long)
    batch = Batch(input_ids=z, targets=z, position_ids=z, seq_index=torch.arange(4), scored_lengths=z[:, 0],
                  attention_mask=z, uid=torch.tensor([2, 0]))
    packed = Batch(input_ids=z.reshape(1, 4), targets=z.reshape(4), position_ids=z.reshape(1, 4),
                   seq_index=torch.arange(4), scored_lengths=z[:, 0], cu_seqlens=torch.arange(5, dtype=torch.int32),
                   cu_seqlens_host=(0, 1, 2, 3, 4), max_seqlen=1, uid=torch.tensor([2, 0]))
    with pytest.raises(RuntimeError, match="precompute cache not built"):
        ref.sequence_logps(batch)
    with pytest.raises(ValueError, match="holds no precomputed reference log-probs"):
        ref.load_state_dict({})
    ref.load_state_dict({"cache": torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]], dtype=torch.float64)})
    assert ref.cache.dtype == torch.float32 and list(ref.state_dict()) == ["cache"]
    # padded layout: slot 0 of every example, then slot 1; packed (cu_seqlens): interleaved per example
    assert ref.sequence_logps(batch).tolist() == [4.0, 0.0, 5.0, 1.0]
    assert ref.sequence_logps(packed).tolist() == [4.0, 5.0, 0.0, 1.0]


def test_none_refuses_log_probs():
    ref = R.make_reference("none", _Policy())
    assert not ref.live
    with pytest.raises(ValueError, match="reference.mode=none: this algorithm needs reference log-probs"):
        ref.compute({})
    with pytest.raises(ValueError, match=r"mode=none"):
        ref.refresh(_Policy())
    ref.load_state_dict({})
    assert ref.state_dict() == {}
