"""Linear probes: one head per task fitted on the frozen base tower's pooled features."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fit_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
             weight_decay: float = 1e-4, steps: int = 100) -> nn.Linear:
    """Full-batch multinomial logistic regression by L-BFGS.

    features (N, D) float, labels (N,) long in [0, num_classes). Minimises
    mean CE(features W^T + b, labels) + weight_decay * ||W||^2 and returns a frozen nn.Linear(D, K).
    The features are used as they come (no standardisation), because the head must apply to the
    raw pooler_output of every tower that shares it.
    """
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"features must be (N, D) and labels (N,), got {tuple(features.shape)} and {tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]")
    head = nn.Linear(features.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")
    X = features.detach().float()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(X), labels) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head.requires_grad_(False)
