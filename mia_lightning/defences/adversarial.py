"""Adversarial regularisation (Nasr, Shokri and Houmansadr, "Machine Learning with Membership Privacy
using Adversarial Regularization", ACM CCS 2018).

Training is a min-max game: an inference model h(f(x), y) learns to tell the classifier's outputs on
its training members from its outputs on a reference set the defender holds (data from the same
distribution that the classifier does not train on), and the classifier minimises its loss plus
lambda times the inference model's gain on the members, min_f [ l(f(x), y) + lambda * log h(f(x), y) ]
(the paper's Algorithm 1: k inference steps, then one classifier step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InferenceModel(nn.Module):
    """h(f(x), y) -> membership logit: the prediction vector and the one-hot label each go through a layer, then a joint MLP (Nasr et al.)."""

    def __init__(self, n_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.prediction = nn.Sequential(nn.Linear(n_classes, hidden), nn.ReLU())
        self.label = nn.Sequential(nn.Linear(n_classes, hidden), nn.ReLU())
        self.joint = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Membership logit [b] from the classifier's logits [b, C] and the labels [b]."""
        posteriors = logits.softmax(dim=-1)
        one_hot = F.one_hot(labels, self.n_classes).to(posteriors.dtype)
        return self.joint(torch.cat([self.prediction(posteriors), self.label(one_hot)], dim=-1)).squeeze(-1)


def inference_loss(h: InferenceModel, member_logits: torch.Tensor, member_labels: torch.Tensor,
                   reference_logits: torch.Tensor, reference_labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of h on members (label 1) and reference samples (label 0); the classifier's outputs are detached."""
    member = h(member_logits.detach(), member_labels)
    reference = h(reference_logits.detach(), reference_labels)
    return F.binary_cross_entropy_with_logits(member, torch.ones_like(member)) + F.binary_cross_entropy_with_logits(reference, torch.zeros_like(reference))


def privacy_penalty(h: InferenceModel, member_logits: torch.Tensor, member_labels: torch.Tensor) -> torch.Tensor:
    """The inference model's gain on the members, mean log h(f(x), y) (what the classifier step minimises, times lambda)."""
    return F.logsigmoid(h(member_logits, member_labels)).mean()
