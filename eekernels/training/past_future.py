"""Fine-tuning with random layer freezing (past-future.txt section 3.4).

"The parameters of a layer will be frozen with a probability p and the probability p
linearly decreases from the first layer to the L-th layer in a range of 1 to 0": layer l
(1-based) of an L-layer encoder is frozen for a training step with probability
``p_l = (L - l) / (L - 1)``, so layer 1 is always frozen (it keeps its pre-trained
features), layer L always trains, and the layers between train more often the deeper
they are. :class:`LayerFreezingCallback` applies it in HF ``Trainer``; embeddings, exit
heads and the Past-Future modules are not encoder layers and are left alone.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn
from transformers import TrainerCallback

__all__ = ["LayerFreezingCallback", "encoder_layers", "freeze_probabilities"]


def freeze_probabilities(num_layers: int) -> torch.Tensor:
    """``p_l = (L - l) / (L - 1)`` for l = 1..L: float64 [L], 1 for the first layer down to
    0 for the last, linearly (section 3.4). A 1-layer encoder is never frozen."""
    if num_layers < 1:
        raise ValueError(f"freeze_probabilities: need num_layers >= 1, got {num_layers}")
    if num_layers == 1:
        return torch.zeros(1, dtype=torch.float64)
    return torch.linspace(1.0, 0.0, num_layers, dtype=torch.float64)


def encoder_layers(model: nn.Module) -> List[nn.Module]:
    """The per-layer modules of an :class:`~eekernels.models.EarlyExitModel` (or subclass)
    or of a supported HF classifier. ALBERT shares one layer's weights across depth, so
    freezing "a layer" is not defined there: a clear error."""
    from ..hf.adapters import adapter_for

    adapter = getattr(model, "adapter", None) or adapter_for(model)
    if adapter.config.model_type == "albert":
        raise ValueError("layer freezing needs per-layer weights; ALBERT shares its layers across depth")
    return [adapter.layer_module(i) for i in range(adapter.num_layers)]


class LayerFreezingCallback(TrainerCallback):
    """HF ``Trainer`` callback: at each optimizer step, freeze each encoder layer l with
    probability ``p_l`` (:func:`freeze_probabilities`).

    At ``on_step_begin`` a fresh draw sets ``requires_grad=False`` on the frozen layers'
    parameters (so backward skips their weight gradients) and restores the others; at
    ``on_pre_optimizer_step`` any gradient left on a frozen parameter is dropped, so the
    optimizer (Adam moments and weight decay included, since PyTorch optimizers skip
    parameters without a gradient) leaves them untouched. At ``on_train_end`` every
    parameter gets its ``requires_grad`` from before training back.

    Args:
        model: the model to freeze in (default: the ``model`` Trainer passes to callbacks).
        seed: seed of the callback's own generator (draws do not disturb the global RNG).

    Attributes:
        probabilities: float64 [L], the freezing probabilities.
        frozen: bool [L], this step's draw (None before the first step).
    """

    def __init__(self, model: Optional[nn.Module] = None, seed: int = 0):
        self.model = model
        self.generator = torch.Generator().manual_seed(seed)
        self.probabilities: Optional[torch.Tensor] = None
        self.frozen: Optional[torch.Tensor] = None
        self._saved = None

    def _layers(self, model) -> List[nn.Module]:
        model = self.model if self.model is not None else model
        if model is None:
            raise ValueError("LayerFreezingCallback: no model (pass one, or use it inside HF Trainer)")
        while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / DataParallel wrappers
            model = model.module
        return encoder_layers(model)

    def draw(self, num_layers: int) -> torch.Tensor:
        """One draw: bool [L], True for the layers frozen this step."""
        self.probabilities = freeze_probabilities(num_layers)
        return torch.rand(num_layers, generator=self.generator, dtype=torch.float64) < self.probabilities

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layers = self._layers(model)
        self._saved = [[p.requires_grad for p in layer.parameters()] for layer in layers]

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        layers = self._layers(model)
        if self._saved is None:
            self._saved = [[p.requires_grad for p in layer.parameters()] for layer in layers]
        self.frozen = self.draw(len(layers))
        for layer, frozen, saved in zip(layers, self.frozen.tolist(), self._saved):
            for p, trainable in zip(layer.parameters(), saved):
                p.requires_grad_(trainable and not frozen)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.frozen is None:
            return
        for layer, frozen in zip(self._layers(model), self.frozen.tolist()):
            if frozen:
                for p in layer.parameters():
                    p.grad = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._saved is None:
            return
        for layer, saved in zip(self._layers(model), self._saved):
            for p, trainable in zip(layer.parameters(), saved):
                p.requires_grad_(trainable)
        self._saved = None
