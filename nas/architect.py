"""The architecture step of the bi-level optimisation (docs/science.md §2.3-2.5).

First order: the gradient of L_val(w, alpha) + regularisers at the current weights.

Second order: a virtual SGD step that mimics the weight optimiser, momentum and weight decay
included, w' = w - eta (mu m + grad_w L_train(w, alpha) + lambda w); then
grad_alpha L_val(w', alpha) - eta * H v, where v = grad_w' L_val(w', alpha) and the Hessian-vector
product H v = grad^2_{alpha,w} L_train v is taken by central differences at w +- R v with
R = 0.01 / ||v||, around the original w (not w'). The regularisers depend on alpha and beta only,
so their gradient adds directly.

Precision: the whole second-order gradient is computed in float32 even where the search's forward
runs under bf16 autocast. The finite difference moves each weight by R v_i, far below bf16's
resolution (8 bits of mantissa): in bf16 most weights are identical at w + R v and w - R v, and the
difference quotient is rounding noise.

The supernet is never modified in place: perturbed and virtual weights go through
`torch.func.functional_call` with copies of the BN buffers, so the step leaves the running
statistics and the weights exactly as they were.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from .losses import regularisers
from .settings import SearchConfig
from .supernet import Architecture, Supernet


class Architect:
    def __init__(self, supernet: Supernet, arch: Architecture, optimizer: torch.optim.Optimizer, config: SearchConfig):
        """`config` gives the order, the weights' SGD momentum and decay (the virtual step of second
        order), the Hessian-vector product's radius and the regularisers' level weighting."""
        self.level_weighting = config.loss.level_weighting
        self.supernet = supernet
        # R = hvp_radius / ||v||: 0.01 in the reference and by default (arch_optim.hvp_radius). A
        # smaller radius is noisier, not more exact, while the difference crosses ReLU and max-pool
        # kinks; only far below float32's resolution does it cross none (docs/science.md §2.5).
        self.hvp_radius = config.arch_optim.hvp_radius
        self.arch = arch
        self.optimizer = optimizer
        self.order = config.order
        self.weight_momentum = config.weights.momentum
        self.weight_decay = config.weights.weight_decay

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.arch.parameters())

    def step(
        self,
        valid_batch: tuple[torch.Tensor, torch.Tensor],
        train_batch: tuple[torch.Tensor, torch.Tensor],
        loss_weights: dict[str, float],
        eta: float,
        weight_optimizer: torch.optim.Optimizer,
    ) -> dict[str, torch.Tensor]:
        """One architecture update; returns the validation CE and the regulariser values (detached)."""
        params = self.parameters()
        if self.order == "first":
            grads, info = self.first_order_grads(valid_batch, loss_weights)
        else:
            grads, info = self.second_order_grads(valid_batch, train_batch, loss_weights, eta, weight_optimizer)
        for p, g in zip(params, grads):
            p.grad = g
        self.optimizer.step()
        return info

    def first_order_grads(self, valid_batch, loss_weights):
        images, labels = valid_batch
        ce = F.cross_entropy(self.supernet(images, self.arch()), labels)
        reg, values = regularisers(self.arch, loss_weights, self.level_weighting)
        # Gradients for alpha and beta only: the weights' gradients of this loss are never used.
        grads = torch.autograd.grad(ce + reg, self.parameters(), allow_unused=True, materialize_grads=True)
        return grads, _detached(ce, values)

    def _functional_loss(self, weights: dict[str, torch.Tensor], buffers, batch) -> torch.Tensor:
        images, labels = batch
        logits = functional_call(self.supernet, {**weights, **buffers}, (images, self.arch()))
        return F.cross_entropy(logits, labels)

    def second_order_grads(self, valid_batch, train_batch, loss_weights, eta, weight_optimizer):
        with self.supernet.full_precision():
            return self._second_order_grads(valid_batch, train_batch, loss_weights, eta, weight_optimizer)

    def _second_order_grads(self, valid_batch, train_batch, loss_weights, eta, weight_optimizer):
        names, weights = zip(*self.supernet.named_parameters())
        # Copies of the BN running statistics absorb the updates of the extra forward passes.
        buffers = {name: b.clone() for name, b in self.supernet.named_buffers()}
        arch_params = self.parameters()

        # Virtual step w' = w - eta (mu m + grad L_train(w) + lambda w), as the weight optimiser does.
        with torch.no_grad():
            fixed = self.arch()
        images, labels = train_batch
        train_loss = F.cross_entropy(
            functional_call(self.supernet, {**dict(zip(names, weights)), **buffers}, (images, fixed)), labels
        )
        weight_grads = torch.autograd.grad(train_loss, weights)
        virtual = []
        with torch.no_grad():
            for w, g in zip(weights, weight_grads):
                state = weight_optimizer.state.get(w, {})
                momentum = state.get("momentum_buffer")
                step = g + self.weight_decay * w
                if momentum is not None:
                    step = step + self.weight_momentum * momentum
                virtual.append((w - eta * step).requires_grad_(True))

        # grad_alpha and v = grad_w' of L_val(w', alpha).
        ce = self._functional_loss(dict(zip(names, virtual)), buffers, valid_batch)
        reg, values = regularisers(self.arch, loss_weights, self.level_weighting)
        grads = torch.autograd.grad(ce + reg, [*arch_params, *virtual], allow_unused=True, materialize_grads=True)
        alpha_grads, v = grads[: len(arch_params)], grads[len(arch_params) :]

        hvp = self.hessian_vector_product(names, weights, v, buffers, train_batch)
        final = [g - eta * h for g, h in zip(alpha_grads, hvp)]
        return final, _detached(ce, values)

    def hessian_vector_product(self, names, weights, v, buffers, batch):
        """(grad_alpha L_train(w + R v) - grad_alpha L_train(w - R v)) / 2R, R = hvp_radius / ||v||."""
        arch_params = self.parameters()
        radius = self.hvp_radius / torch.sqrt(sum((x.double() ** 2).sum() for x in v)).item()
        results = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                shifted = {n: w + sign * radius * d for n, w, d in zip(names, weights, v)}
            loss = self._functional_loss(shifted, buffers, batch)
            results.append(torch.autograd.grad(loss, arch_params, allow_unused=True, materialize_grads=True))
        return [(p - n) / (2 * radius) for p, n in zip(*results)]


def _detached(ce: torch.Tensor, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    info = {"arch_ce": ce.detach()}
    info.update({name: value.detach() for name, value in values.items()})
    return info
