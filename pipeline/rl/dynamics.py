"""A learned dynamics model: an ensemble of probabilistic MLPs.

Each of the E members maps (state features, action) to a diagonal Gaussian
over the change of the state, and is fitted by Gaussian negative
log-likelihood on its own bootstrap of the transitions (PETS-style; the
ML3 paper's reacher uses 3 members). Inputs and targets are standardized
with statistics of the data the model was last fitted on. The log-variance
is kept between learned soft bounds, so that no member can drive it to
minus infinity on a point it memorized.

The ensemble's prediction used for planning is the mean of the members'
means: deterministic and differentiable, so a task loss of a rollout has a
gradient w.r.t. the policy through the model.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class ProbabilisticEnsemble(nn.Module):
    """``ensemble_size`` Gaussian MLPs ``n_inputs -> n_outputs`` evaluated at once.

    Args:
      n_inputs: width of one input row.
      n_outputs: width of the predicted change.
      ensemble_size: number of members.
      hidden_sizes: hidden widths (SiLU activations).
      generator: draws the initial weights (torch's global RNG if None).
    """

    def __init__(
        self,
        n_inputs: int,
        n_outputs: int,
        ensemble_size: int,
        hidden_sizes,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        sizes = [n_inputs, *hidden_sizes, 2 * n_outputs]
        self.config = {
            "n_inputs": n_inputs,
            "n_outputs": n_outputs,
            "ensemble_size": ensemble_size,
            "hidden_sizes": list(hidden_sizes),
        }
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            bound = 1.0 / math.sqrt(a)
            self.weights.append(
                nn.Parameter(
                    (2 * torch.rand(ensemble_size, a, b, generator=generator) - 1)
                    * bound
                )
            )
            self.biases.append(nn.Parameter(torch.zeros(ensemble_size, 1, b)))
        self.max_logvar = nn.Parameter(torch.full((n_outputs,), 0.5))
        self.min_logvar = nn.Parameter(torch.full((n_outputs,), -10.0))
        for name, width in (("in", n_inputs), ("out", n_outputs)):
            self.register_buffer(f"{name}_mean", torch.zeros(width))
            self.register_buffer(f"{name}_std", torch.ones(width))

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden layer ``[E, B, width]`` of every member."""
        h = (x - self.in_mean) / self.in_std
        if h.dim() == 2:
            h = h.expand(len(self.weights[0]), *h.shape)
        for w, b in zip(self.weights[:-1], self.biases[:-1], strict=True):
            h = F.silu(torch.baddbmm(b, h, w))
        return h

    def _normalized(self, x: torch.Tensor):
        """Mean and log-variance ``[E, B, n_outputs]`` in standardized units."""
        h = torch.baddbmm(self.biases[-1], self._hidden(x), self.weights[-1])
        mean, logvar = h.chunk(2, dim=-1)
        logvar = self.max_logvar - F.softplus(self.max_logvar - logvar)
        logvar = self.min_logvar + F.softplus(logvar - self.min_logvar)
        return mean, logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The mean predicted change ``[B, n_outputs]`` over members."""
        # the mean half of the last layer only: rollouts need no variance
        n = self.config["n_outputs"]
        mean = torch.baddbmm(
            self.biases[-1][..., :n], self._hidden(x), self.weights[-1][..., :n]
        )
        return mean.mean(0) * self.out_std + self.out_mean

    def member_means(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's predicted change ``[E, B, n_outputs]``."""
        mean, _ = self._normalized(x)
        return mean * self.out_std + self.out_mean

    def nll(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gaussian negative log-likelihood of standardized targets, per member.

        ``x [E, B, n_inputs]``, ``y [E, B, n_outputs]``; the log-variance
        bounds get a small penalty so that they stay tight.
        """
        mean, logvar = self._normalized(x)
        target = (y - self.out_mean) / self.out_std
        nll = ((mean - target) ** 2 * torch.exp(-logvar) + logvar).mean()
        return nll + 0.01 * (self.max_logvar.sum() - self.min_logvar.sum())

    @torch.no_grad()
    def set_normalization(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Standardization statistics from transitions ``x [N, in]``, ``y [N, out]``."""
        for name, t in (("in", x), ("out", y)):
            getattr(self, f"{name}_mean").copy_(t.mean(0))
            getattr(self, f"{name}_std").copy_(t.std(0).clamp_min(1e-6))

    def fit(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        epochs: int,
        lr: float,
        batch_size: int,
        generator: torch.Generator,
    ) -> list[float]:
        """Fits every member on its own bootstrap of ``(x, y)``; epoch losses.

        Re-standardizes first, so that refits on a grown dataset see it
        whole. Raises ``FloatingPointError`` if the loss stops being finite.
        """
        self.set_normalization(x, y)
        n, e = len(x), self.config["ensemble_size"]
        boot = torch.randint(0, n, (e, n), generator=generator)
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        history = []
        for epoch in range(epochs):
            order = torch.argsort(torch.rand(e, n, generator=generator), dim=1)
            total, batches = 0.0, 0
            for start in range(0, n, batch_size):
                idx = boot.gather(1, order[:, start : start + batch_size])
                loss = self.nll(x[idx], y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, batches = total + loss.item(), batches + 1
            if not math.isfinite(total):
                raise FloatingPointError(
                    f"dynamics model fit diverged at epoch {epoch}: loss {total}; "
                    "lower meta_train.model_lr"
                )
            history.append(total / batches)
        return history

    @torch.no_grad()
    def mse(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Mean squared error of the mean prediction, in standardized units."""
        return float((((self(x) - y) / self.out_std) ** 2).mean())
