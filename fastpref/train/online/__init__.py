"""On-line methods (generate, score, train): importing this package registers them with the trainer.

``grpo`` (GRPO / DAPO / Dr. GRPO / BNPO / GSPO), ``ppo`` (critic on the policy trunk, GAE), ``online_dpo``
(iterative DPO), ``self_rewarding``, ``spin``, ``dice`` and ``apo``. See ``docs/online.md``.
"""

from fastpref.train.online import grpo  # noqa: F401  (registers the algorithm)
from fastpref.train.online import ppo  # noqa: F401
from fastpref.train.online import dice, online_dpo, self_rewarding, spin  # noqa: F401
from fastpref.train.online import apo  # noqa: F401
