"""No host syncs from fastpref's own code in a training micro-batch (issue 15): DPO padded and packed (with the default
``skip_unscored``, and packed without it), KTO padded, GRPO and online DPO packed, through the trainer on the tiny
model (``fastpref.benchmarks.host_syncs``), counted by ``fastpref.testing.HostSyncCounter`` and attributed to the
innermost non-torch frame. transformers' own reads (the padding-mask checks of a padded batch) are bounded by the
documented count."""

from __future__ import annotations

import pytest
import torch

from fastpref.benchmarks.host_syncs import TRANSFORMERS_BOUND, measure
from fastpref.testing import HostSyncCounter


@pytest.mark.parametrize("case", ["dpo padded", "dpo packed", "grpo packed", "online_dpo packed",
                                  "dpo packed no-skip", "kto padded"])
def test_no_host_syncs_from_fastpref_in_a_training_micro_batch(case, tmp_path):
    m = measure(case, str(tmp_path))
    batch = m.micro_batch if not hasattr(m.micro_batch, "batch") else m.micro_batch.batch
    assert batch is not None, f"{case}: the measured micro-batch trained on nothing"
    assert batch.packed == ("packed" in case)
    assert m.own == 0, f"{case}: {m.own} host syncs from fastpref: {m.where()}"
    assert m.other == 0, f"{case}: {m.where()}"
    assert m.transformers <= TRANSFORMERS_BOUND[case], f"{case}: {m.where()}"


def test_counter_attributes_syncs_to_the_calling_library():
    """The counter can fail: a sync asked for by fastpref code counts as fastpref's, one inside transformers as
    transformers', and a device-only counter ignores CPU tensors."""
    from transformers.masking_utils import find_packed_sequence_indices

    from fastpref.attention.hf import cu_seqlens_from_position_ids

    pos = torch.tensor([[0, 1, 2, 0, 1]])
    with HostSyncCounter() as c:
        cu, max_seqlen, host = cu_seqlens_from_position_ids(pos, 1, 5)
        again = cu_seqlens_from_position_ids(pos, 1, 5)  # stored on the tensor: no second read
        find_packed_sequence_indices(pos)
    assert host == (0, 3, 5) and max_seqlen == 3 and cu.tolist() == [0, 3, 5] and again[2] == host
    assert c.by_origin == {"fastpref": 1, "transformers": 1}, (c.by_origin, c.origin_where)
    assert c.own == 1 and c.where["tolist"][0].startswith("attention/hf.py:")
    with HostSyncCounter(device_only=True) as d:
        pos.tolist()
    assert d.total == 0
