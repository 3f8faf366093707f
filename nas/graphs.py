"""The first-order search step written for CUDA graphs (docs/gpu.md, "The step as one graph").

On a GPU the search step is bound by PyTorch's host work per kernel, not by the kernels: a
standard step launches 22-32 thousand of them. The step is static (fixed batch shapes, fixed
supernet, no data-dependent control flow), so it can be captured once with `torch.cuda.graph` and
replayed: one launch per step. What that takes, and what this module does:

- Nothing in the step reads a value to the host (`.item()`, `nonzero`, data-dependent shapes):
  tests/test_graphs.py runs the step under a dispatch mode that fails on those.
- Every value that changes between steps or epochs (the weights' learning rate from the cosine
  schedule, alpha's and beta's learning rates, alpha's zero rate during warm-up, the scheduled loss
  weights) lives in a 0-dim device tensor of `StepControls`, written in place; a captured graph
  reads the tensor, where a Python float would be baked into the kernels' arguments at capture.
- The optimisers' updates are written here with foreach ops over the optimisers' own state
  tensors (the same state, so checkpoints and eager resumption see no difference): the same
  formulas as torch.optim.SGD (momentum, weight decay) and torch.optim.Adam (L2 weight decay,
  bias corrections), with the learning rates and Adam's step counts as device tensors.
  torch.optim.SGD reads a tensor learning rate to the host, and torch.optim.Adam is capturable
  (`capturable=True`) only on accelerators, so the absence of host reads could not be checked on
  the CPU.
- Gradient clipping as torch.nn.utils.clip_grad_norm_ computes it, the scale a device tensor.
- Batches are copied into static input buffers; a batch of another shape (the short last batch of
  a pass) runs the same step eagerly.

`StaticStep` is the step (it runs eagerly anywhere); `GraphedStep` captures it on CUDA after
warm-up iterations on a side stream (whose effects on the weights, the architecture, BN
statistics and optimiser states are undone before the capture), replays it every step, and falls
back to running it eagerly, with one warning, if the capture fails. The graph is captured again
when a tensor it reads was replaced (a checkpoint loaded into the optimisers, for one).

Second order stays eager: its finite-difference radius 0.01/||v|| is read to the host, and its
virtual step reads the weight optimiser's momentum buffers, which exist only after the first step.
Both could be made static; until the first-order graph has been checked on a GPU, it is not.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .losses import TERM_FUNCTIONS

if TYPE_CHECKING:
    from .searcher import Search

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
StepOutput = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


class StepControls:
    """The step's changing values as 0-dim float32 tensors on the search's device, written in
    place (and only when they change) by `set`."""

    def __init__(self, device: torch.device, terms: Sequence[str]):
        def scalar() -> torch.Tensor:
            return torch.zeros((), dtype=torch.float32, device=device)

        self.lr = scalar()
        self.arch_lrs = [scalar(), scalar()]  # alpha's group, beta's group
        self.loss_weights = {name: scalar() for name in terms}
        self._written: dict[int, float] = {}

    def _write(self, tensor: torch.Tensor, value: float) -> None:
        if self._written.get(id(tensor)) != value:
            tensor.fill_(value)  # a kernel with the value as its argument: no synchronisation
            self._written[id(tensor)] = value

    def set(self, lr: float, arch_lrs: Sequence[float], loss_weights: dict[str, float]) -> None:
        self._write(self.lr, lr)
        for tensor, value in zip(self.arch_lrs, arch_lrs):
            self._write(tensor, value)
        for name, tensor in self.loss_weights.items():
            self._write(tensor, loss_weights.get(name, 0.0))


class StaticStep:
    """One first-order search step (docs/science.md §2.3: the architecture update on the validation
    batch, then the weight update on the training batch) with no host reads and every schedule
    value read from `controls`. Equal to `Search.step` up to float32 round-off (the learning rates
    are float32 tensors here, Python floats there)."""

    def __init__(self, search: Search):
        config = search.config
        if config.order != "first":
            raise ValueError("the static step is first order; second order runs eagerly")
        self.search = search
        group = search.weight_optimizer.param_groups[0]
        if group["nesterov"] or group["dampening"] or len(search.weight_optimizer.param_groups) != 1:
            raise ValueError("the static step implements SGD with one group, plain momentum")
        self.weights: list[torch.Tensor] = list(group["params"])
        self.momentum = group["momentum"]
        self.weight_decay = group["weight_decay"]
        self.grad_clip = config.weights.grad_clip
        self.level_weighting = config.loss.level_weighting
        # Terms whose configured weight is 0 never enter the loss (as in `losses.regularisers`);
        # the others enter with their scheduled weight, 0 included, read from `controls`.
        used = [name for name, term in config.loss.terms().items() if term.weight != 0.0]
        device = search.arch.alphas[0].device
        self.controls = StepControls(device, used)
        self.device = device

    # The optimisers' state, created as torch.optim creates it on a first step (a zero momentum
    # buffer gives the same first update as torch's copy of the gradient), so that a captured step
    # finds every tensor it updates.
    def ensure_state(self) -> None:
        sgd = self.search.weight_optimizer
        if self.momentum:
            for p in self.weights:
                state = sgd.state[p]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        adam = self.search.arch_optimizer
        for group in adam.param_groups:
            for p in group["params"]:
                state = adam.state[p]
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif state["step"].device != p.device:
                    state["step"] = state["step"].to(p.device)

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor the step reads or writes besides its inputs: weights, BN statistics,
        architecture parameters, optimiser states, controls."""
        search = self.search
        tensors = [*search.supernet.parameters(), *search.supernet.buffers(), *search.arch.parameters()]
        for optimizer in (search.weight_optimizer, search.arch_optimizer):
            for state in optimizer.state.values():
                tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
        tensors += [self.controls.lr, *self.controls.arch_lrs, *self.controls.loss_weights.values()]
        return tensors

    def __call__(self, train_batch: Batch, valid_batch: Batch) -> StepOutput:
        self.ensure_state()
        info = self._architecture_step(valid_batch)
        loss, logits = self._weight_step(train_batch)
        return loss, logits, info

    def _architecture_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        search = self.search
        arch = search.arch
        images, labels = batch
        ce = F.cross_entropy(search.supernet(images, arch()), labels)
        values = {name: fn(arch, self.level_weighting) for name, fn in TERM_FUNCTIONS.items()}
        reg = arch.alphas[0].new_zeros(())
        for name, weight in self.controls.loss_weights.items():
            reg = reg + weight * values[name]
        params = [p for group in search.arch_optimizer.param_groups for p in group["params"]]
        grads = torch.autograd.grad(ce + reg, params, allow_unused=True, materialize_grads=True)
        self._adam(grads)
        return {"arch_ce": ce.detach(), **{name: value.detach() for name, value in values.items()}}

    def _adam(self, grads: Sequence[torch.Tensor]) -> None:
        """torch.optim.Adam's update (L2 weight decay, no amsgrad) with device-tensor learning
        rates and step counts."""
        adam = self.search.arch_optimizer
        grads = iter(grads)
        with torch.no_grad():
            for group, lr in zip(adam.param_groups, self.controls.arch_lrs):
                beta1, beta2 = group["betas"]
                for p in group["params"]:
                    grad = next(grads)
                    state = adam.state[p]
                    if group["weight_decay"]:
                        grad = grad.add(p, alpha=group["weight_decay"])
                    step = state["step"]
                    step.add_(1)
                    state["exp_avg"].lerp_(grad, 1 - beta1)
                    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    correction1 = 1 - torch.pow(beta1, step)
                    correction2_sqrt = (1 - torch.pow(beta2, step)).sqrt()
                    denom = (state["exp_avg_sq"].sqrt() / correction2_sqrt).add_(group["eps"])
                    p.sub_(state["exp_avg"] / denom * (lr / correction1))

    def _weight_step(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        search = self.search
        images, labels = batch
        with torch.no_grad():
            arch_weights = search.arch()
        logits = search.supernet(images, arch_weights)
        loss = F.cross_entropy(logits, labels)
        grads = list(torch.autograd.grad(loss, self.weights, allow_unused=True, materialize_grads=True))
        with torch.no_grad():
            if self.grad_clip is not None:
                # clip_grad_norm_'s arithmetic: the 2-norm of the per-tensor norms, the scale
                # max / (norm + 1e-6) capped at 1, on the device.
                total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
                scale = torch.clamp(self.grad_clip / (total + 1e-6), max=1.0)
                torch._foreach_mul_(grads, scale)
            self._sgd(grads)
        return loss.detach(), logits.detach()

    def _sgd(self, grads: list[torch.Tensor]) -> None:
        """torch.optim.SGD's update (weight decay, momentum without dampening) with a
        device-tensor learning rate."""
        if self.weight_decay:
            grads = torch._foreach_add(grads, self.weights, alpha=self.weight_decay)
        if self.momentum:
            state = self.search.weight_optimizer.state
            buffers = [state[p]["momentum_buffer"] for p in self.weights]
            torch._foreach_mul_(buffers, self.momentum)
            torch._foreach_add_(buffers, grads)
            grads = buffers
        torch._foreach_sub_(self.weights, torch._foreach_mul(grads, self.controls.lr))


class GraphedStep:
    """`StaticStep` captured as one CUDA graph and replayed (`capture=False`: run eagerly, the
    same code the graph holds; for the CPU and for comparisons)."""

    def __init__(self, step: StaticStep, capture: bool = True, warmup: int = 3):
        self.step = step
        self.capture = capture and step.device.type == "cuda"
        self.warmup = warmup
        self.graph: Any = None
        self.failed = False
        self.captures = 0
        self.replays = 0
        self._inputs: tuple[torch.Tensor, ...] = ()
        self._outputs: StepOutput | None = None
        self._pointers: list[int] = []

    @property
    def controls(self) -> StepControls:
        return self.step.controls

    def invalidate(self) -> None:
        """Forget the graph (the tensors it reads may have been replaced); the next step captures anew."""
        self.graph = None
        self._outputs = None

    def check_state(self) -> None:
        """Forgets the graph if a tensor it reads was replaced since its capture (the search calls
        this once per epoch: walking the state costs milliseconds at the default size, about 5,600
        tensors, too much for every step)."""
        if self.graph is not None and self._pointers != self._state_pointers():
            self.invalidate()

    def __call__(self, train_batch: Batch, valid_batch: Batch) -> StepOutput:
        batch = (*train_batch, *valid_batch)
        if self.capture and not self.failed:
            if self.graph is None:
                self._capture(batch)
            if self.graph is not None and all(
                b.shape == s.shape and b.dtype == s.dtype for b, s in zip(batch, self._inputs)
            ):
                for static, new in zip(self._inputs, batch):
                    static.copy_(new)
                self.graph.replay()
                self.replays += 1
                assert self._outputs is not None
                return self._outputs
        return self.step(train_batch, valid_batch)

    def _state_pointers(self) -> list[int]:
        return [t.data_ptr() for t in self.step.state_tensors()]

    def _capture(self, batch: tuple[torch.Tensor, ...]) -> None:
        step = self.step
        step.ensure_state()
        inputs = tuple(b.clone() for b in batch)
        state = step.state_tensors()
        saved = [t.clone() for t in state]
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    step(inputs[:2], inputs[2:])
            torch.cuda.current_stream().wait_stream(side)
            # The warm-up steps trained: put back what they changed, in place (the graph will
            # read these very tensors).
            _restore(state, saved)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = step(inputs[:2], inputs[2:])
        except Exception as err:
            _restore(state, saved)
            self.failed = True
            log.warning("runtime.cuda_graphs: capturing the search step failed (%s); the search runs eagerly", err)
            return
        self.graph, self._inputs, self._outputs = graph, inputs, outputs
        self._pointers = self._state_pointers()
        self.captures += 1


def _restore(tensors: Sequence[torch.Tensor], saved: Sequence[torch.Tensor]) -> None:
    """Copies `saved` back into `tensors`, in place."""
    with torch.no_grad():
        for tensor, value in zip(tensors, saved):
            tensor.copy_(value)
