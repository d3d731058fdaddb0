"""Machine unlearning workload: plans, the unlearning engine, the Adult data and the ``unlearning.json`` contract.

Chen et al., "When Machine Unlearning Jeopardizes Privacy", ACM CCS 2021 (the attack on original /
unlearned model pairs) and Hayes et al., "Inexact Unlearning Needs More Careful Evaluations to
Avoid a False Sense of Privacy", IEEE SaTML 2025 (U-LiRA). The attacks live in
``mia_lightning.attacks.unlearning`` and ``mia_lightning.attacks.ulira``.
"""
