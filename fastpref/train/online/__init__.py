"""On-line methods (generate, score, train): importing this package registers them with the trainer.

``grpo`` (GRPO / DAPO / Dr. GRPO / BNPO / GSPO), ``ppo`` (value head on the policy trunk or a separate critic,
GAE), ``online_dpo`` (on-line DPO), ``ilr_dpo`` (iterative length-regularised DPO), ``self_rewarding``, ``spin``,
``dice`` and ``apo``. See ``docs/online.md``.
"""

from fastpref.train.online import apo, dice, grpo, ilr_dpo, online_dpo, ppo, self_rewarding, spin  # noqa: F401,E501
