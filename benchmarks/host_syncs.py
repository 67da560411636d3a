"""Host syncs per training micro-batch of the trainer: DPO (padded and packed), GRPO and online DPO (packed), tiny
model, CPU.

``python benchmarks/host_syncs.py`` runs a 2-step run of each case through the trainer, counts with
:class:`fastpref.testing.HostSyncCounter` the calls that would be device->host syncs on a GPU during the LAST
training micro-batch (the algorithm's ``compute_loss``: reference and policy forwards, the fused loss; then the
backward), and prints them per origin (fastpref's own code vs transformers') next to the counts measured before
the batch refactor of issue 15 (commit 1b5b41b, ``/tmp/count_syncs.py``). ``tests/test_host_syncs.py`` asserts the
same counts: zero from fastpref, transformers' bounded by :data:`TRANSFORMERS_BOUND`.

What remains, all inside transformers 5.24's and 5.25's padding-mask handling of a PADDED batch (the model's own SDPA
attention; a packed batch has none, see ``fastpref.attention.hf``): ``masking_utils._ignore_causal_mask_sdpa``
reads whether the 2-D padding mask is all ones (``fast_all``) to skip materialising the 4-D mask -- up to 2 reads
per forward (the full mask, then its prompt part when there is padding), so 4 per DPO micro-batch (reference +
policy). Avoiding them would mean building the ``[B, 1, T, T]`` mask ourselves (memory, and SDPA's ``is_causal``
fast path lost); use ``data.pack=true`` for a sync-free step.
"""

from __future__ import annotations

import collections
import tempfile
from dataclasses import dataclass

BEFORE = {  # measured at 1b5b41b (before issue 15's single batch type), per micro-batch: (fastpref, transformers)
    "dpo padded": (2, 4),
    "dpo packed": (9, 2),
    "grpo packed": (4, 1),  # measured with this script run on the 1b5b41b tree
    "online_dpo packed": (2, None),  # measured at da30cbd (the fused loss still validating its tensors)
    "dpo packed no-skip": (None, None),  # skip_unscored was not reachable from the config before issue 15
    "kto padded": (None, None),
}
TRANSFORMERS_BOUND = {"dpo padded": 4, "dpo packed": 0, "grpo packed": 0, "online_dpo packed": 0,
                      "dpo packed no-skip": 0, "kto padded": 8}
"""transformers' syncs per micro-batch now (module docstring: 2 per padded forward, none packed; KTO runs four
forwards: policy and reference on the batch and on its mismatched pairs)."""


def spread_reward(completions, **_) -> list[float]:
    """A reward with variance inside every group (alternating 0, 1), so GRPO always has a micro-batch to train."""
    return [float(i % 2) for i in range(len(completions))]


@dataclass
class Measured:
    """The counters of the last training micro-batch of a run."""

    compute_loss: object
    backward: object
    micro_batch: object
    """What ``compute_loss`` got (the typed micro-batch)."""

    @property
    def own(self) -> int:
        return self.compute_loss.own + self.backward.own

    @property
    def transformers(self) -> int:
        return (self.compute_loss.by_origin.get("transformers", 0) + self.backward.by_origin.get("transformers", 0))

    @property
    def other(self) -> int:
        return self.compute_loss.by_origin.get("other", 0) + self.backward.by_origin.get("other", 0)

    def where(self) -> dict[str, list]:
        out: dict[str, list] = {}
        for c in (self.compute_loss, self.backward):
            for k, v in c.origin_where.items():
                out.setdefault(k, []).extend(v)
        return {k: collections.Counter(v).most_common(8) for k, v in out.items()}


CASES = {
    "dpo padded": ("dpo", ["data.pack=false"]),
    "dpo packed": ("dpo", ["data.pack=true"]),
    "grpo packed": ("grpo", ["data.pack=true", "reference.mode=copy", "grpo.beta=0.04", "grpo.num_iterations=2",
                             "grpo.reward=fastpref.benchmarks.host_syncs:spread_reward",
                             "grpo.generation.num_generations=2", "grpo.generation.max_new_tokens=4"]),
    "dpo packed no-skip": ("dpo", ["data.pack=true", "dpo.skip_unscored=false"]),
    "kto padded": ("kto", ["data.pack=false"]),
    "online_dpo packed": ("online_dpo", ["data.pack=true",
                                         "online_dpo.reward=fastpref.benchmarks.host_syncs:spread_reward",
                                         "online_dpo.generation.num_generations=2",
                                         "online_dpo.generation.max_new_tokens=4"]),
}


def measure(case: str, output_dir: str | None = None) -> Measured:
    """Run ``case`` (a key of :data:`CASES`) for 2 steps and count the syncs of its last training micro-batch."""
    import fastpref.train.distributed as D
    from fastpref.testing import HostSyncCounter
    from fastpref.train.algorithms.base import ALGORITHMS, load_builtin_algorithms
    from fastpref.train.config import load_config
    from fastpref.train.trainer import Trainer

    import fastpref.train.online  # noqa: F401  (registers the on-line algorithms)

    load_builtin_algorithms()
    algorithm, overrides = CASES[case]
    cfg = load_config(None, [f"output_dir={output_dir or tempfile.mkdtemp()}", f"algorithm={algorithm}",
                             "train.max_steps=2", "train.batch_size=4", "data.synthetic_rows=40", "train.plots=false",
                             "train.eval_every=0", *overrides])
    cls = ALGORITHMS[algorithm]
    seen: list[tuple[str, HostSyncCounter, object]] = []

    def counting(fn, label):
        def wrapped(*a, **k):
            c = HostSyncCounter()
            with c:
                out = fn(*a, **k)
            seen.append((label, c, a[1] if len(a) > 1 else None))
            return out
        return wrapped

    loss_fn, backward = cls.compute_loss, D.Parallel.backward
    cls.compute_loss, D.Parallel.backward = counting(loss_fn, "compute_loss"), counting(backward, "backward")
    try:
        Trainer(cfg, quiet=True).run()
    finally:
        cls.compute_loss, D.Parallel.backward = loss_fn, backward
    i = max(j for j, (label, _, _) in enumerate(seen) if label == "backward")
    if i == 0 or seen[i - 1][0] != "compute_loss":
        raise RuntimeError(f"{case}: no compute_loss before the last backward")
    return Measured(seen[i - 1][1], seen[i][1], seen[i - 1][2])


def main() -> None:
    rows = []
    for case in CASES:
        m = measure(case)
        rows.append((case, m))
    print(f"\n{'micro-batch':<26} {'fastpref before':>15} {'fastpref now':>13} {'transformers before':>20} "
          f"{'transformers now':>17} {'other':>6}")
    for case, m in rows:
        b_own, b_tf = BEFORE[case]
        fmt = lambda x: "-" if x is None else str(x)  # noqa: E731
        print(f"{case:<26} {fmt(b_own):>15} {m.own:>13} {fmt(b_tf):>20} {m.transformers:>17} {m.other:>6}")
    for case, m in rows:
        if m.where():
            print(f"  {case}: {m.where()}")


if __name__ == "__main__":
    main()
