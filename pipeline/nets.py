"""Small networks: the optimizee MLPs and the learned loss M_phi."""

from __future__ import annotations

import math

import torch
from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
}
INITS = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "default")
OUTPUT_ACTIVATIONS = ("softplus", "none")
PREDICTION_TRANSFORMS = ("identity", "sigmoid")


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {name!r}; valid activations: {', '.join(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]()


def build_mlp(
    n_inputs: int, hidden_sizes, n_outputs: int, activation: str, bias: bool = True
) -> nn.Sequential:
    """Linear layers of the given widths with ``activation`` between them."""
    sizes = [n_inputs, *hidden_sizes, n_outputs]
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out, bias=bias))
        if i < len(sizes) - 2:
            layers.append(_activation(activation))
    return nn.Sequential(*layers)


def init_weights(module: nn.Module, scheme: str) -> None:
    """Re-initializes every Linear layer of ``module`` in place.

    ``default`` keeps torch's own initialization; biases start at zero for
    the other schemes.
    """
    if scheme == "default":
        return
    inits = {
        "xavier_uniform": nn.init.xavier_uniform_,
        "xavier_normal": nn.init.xavier_normal_,
        "kaiming_uniform": lambda w: nn.init.kaiming_uniform_(w, a=math.sqrt(5)),
    }
    if scheme not in inits:
        raise ValueError(
            f"unknown init {scheme!r}; valid inits: default, {', '.join(inits)}"
        )
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            inits[scheme](layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class LearnedLoss(nn.Module):
    """The learned loss M_phi: an MLP over (prediction, target, task info).

    Each input is a tensor of shape ``[N]`` or ``[N, d_i]``; they are joined
    along the last axis into ``[N, n_inputs]`` with ``n_inputs = sum(d_i)``.
    The network maps every row to one value, and the loss is the mean over
    rows, a scalar, so that the module drops into any training loop in
    place of ``nn.MSELoss()`` or ``nn.BCEWithLogitsLoss()``.

    Args:
      n_inputs: total width of the joined inputs.
      hidden_sizes: widths of the hidden layers.
      activation: hidden activation name (see ``ACTIVATIONS``).
      bias: whether the linear layers have biases.
      init: weight initialization (``xavier_uniform``, ``xavier_normal``,
        ``kaiming_uniform`` or ``default``).
      output_activation: ``softplus`` (non-negative loss, as in the paper)
        or ``none``.
      prediction_transform: applied to the first input before the network;
        ``sigmoid`` lets a classifier pass logits while the loss sees
        probabilities.
    """

    def __init__(
        self,
        n_inputs: int,
        hidden_sizes=(50, 50),
        activation="relu",
        bias=False,
        init="xavier_uniform",
        output_activation="softplus",
        prediction_transform="identity",
    ):
        super().__init__()
        if n_inputs < 1:
            raise ValueError(f"n_inputs must be >= 1, got {n_inputs}")
        if output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(
                f"unknown output_activation {output_activation!r}; "
                "valid: softplus, none"
            )
        if prediction_transform not in PREDICTION_TRANSFORMS:
            raise ValueError(
                f"unknown prediction_transform {prediction_transform!r}; "
                "valid: identity, sigmoid"
            )
        self.config = {
            "n_inputs": n_inputs,
            "hidden_sizes": list(hidden_sizes),
            "activation": activation,
            "bias": bias,
            "init": init,
            "output_activation": output_activation,
            "prediction_transform": prediction_transform,
        }
        self.net = build_mlp(n_inputs, hidden_sizes, 1, activation, bias=bias)
        init_weights(self.net, init)
        self.output = (
            nn.Softplus() if output_activation == "softplus" else nn.Identity()
        )

    def join_inputs(self, prediction, *others) -> torch.Tensor:
        """Joins the inputs into ``[N, n_inputs]``, checking their shapes."""
        if self.config["prediction_transform"] == "sigmoid":
            prediction = torch.sigmoid(prediction)
        columns = [
            t.unsqueeze(-1) if t.dim() == 1 else t for t in (prediction, *others)
        ]
        rows = {c.shape[0] for c in columns}
        if len(rows) != 1 or any(c.dim() != 2 for c in columns):
            shapes = ", ".join(str(tuple(t.shape)) for t in (prediction, *others))
            raise ValueError(
                "LearnedLoss inputs must be [N] or [N, d] with the same N; "
                f"got {shapes}"
            )
        joined = torch.cat(columns, dim=-1)
        if joined.shape[-1] != self.config["n_inputs"]:
            raise ValueError(
                f"LearnedLoss expects {self.config['n_inputs']} input columns, "
                f"got {joined.shape[-1]} from shapes "
                f"{[tuple(t.shape) for t in (prediction, *others)]}"
            )
        return joined

    def pointwise(self, prediction, *others) -> torch.Tensor:
        """Loss value of every row, shape ``[N]``."""
        return self.output(self.net(self.join_inputs(prediction, *others))).squeeze(-1)

    def forward(self, prediction, *others) -> torch.Tensor:
        """Mean loss over rows: a scalar."""
        return self.pointwise(prediction, *others).mean()


def learned_loss_for(p, n_inputs: int) -> LearnedLoss:
    """A fresh learned loss over ``n_inputs`` columns, shaped by params ``p``.

    ``p`` is a ``learned_loss`` section of ``params.yaml``
    (:class:`pipeline.config.LearnedLossParams`).
    """
    return LearnedLoss(
        n_inputs,
        p.hidden_sizes,
        p.activation,
        bias=p.bias,
        init=p.init,
        output_activation=p.output_activation,
        prediction_transform=p.prediction_transform,
    )


def learned_loss_from_config(config: dict) -> LearnedLoss:
    """Rebuilds a :class:`LearnedLoss` from its ``config`` attribute."""
    allowed = {
        "n_inputs",
        "hidden_sizes",
        "activation",
        "bias",
        "init",
        "output_activation",
        "prediction_transform",
    }
    unknown = set(config) - allowed
    if unknown:
        raise ValueError(
            f"unknown learned-loss config keys {sorted(unknown)}; "
            f"allowed: {sorted(allowed)}"
        )
    return LearnedLoss(**config)
