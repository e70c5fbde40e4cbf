"""Fine-tuning with random layer freezing (past-future.txt section 3.4, section 4.1).

Section 3.4: "the parameters of a layer will be frozen with a probability p and the
probability p linearly decreases from the first layer to the L-th layer in a range of 1 to
0"; section 4.1 grid-searches "number of frozen layers during fine-tuning as {0,1,2,3}".
So only the lowest L layers are ever frozen (L = 0: no freezing), layer 1 with p = 1 and
the probability falling linearly with depth:

    p_l = (L + 1 - l) / L  for l = 1..L,   p_l = 0 for l > L

(L = 3: 1, 2/3, 1/3, then 0). We read "from 1 to 0" as reaching 0 at layer L + 1, the
first layer that always trains: ending at p_L = 0 instead would never freeze the L-th
layer, leave L = 1 undefined and make L = 2 the same schedule as L = 1, while 4.1 counts L
as the number of frozen layers; the authors' code (lancopku/Early-Exit,
``--freezed_lower_layer``, default 0) likewise gives every one of the lowest L layers a
non-zero freezing probability. (That code anneals the probability over the training steps
rather than over depth; we follow the paper's text.)

:class:`LayerFreezingCallback` draws each of those layers independently at every optimizer
step in HF ``Trainer``; embeddings, exit heads and the Past-Future modules are not encoder
layers and are left alone.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn
from transformers import TrainerCallback

__all__ = ["LayerFreezingCallback", "encoder_layers", "freeze_probabilities"]


def freeze_probabilities(num_layers: int, freeze_layers: int) -> torch.Tensor:
    """The freezing probability of each of the ``num_layers`` encoder layers when the lowest
    ``freeze_layers`` (the paper's L) are frozen at random: float64 [num_layers],
    ``p_l = (L + 1 - l) / L`` for l <= L and 0 above (section 3.4; see the module docstring)."""
    if num_layers < 1:
        raise ValueError(f"freeze_probabilities: need num_layers >= 1, got {num_layers}")
    if isinstance(freeze_layers, bool) or not isinstance(freeze_layers, int) or not 0 <= freeze_layers <= num_layers:
        raise ValueError(f"freeze_probabilities: freeze_layers (L) must be an integer in [0, {num_layers}], "
                         f"got {freeze_layers!r}")
    p = torch.zeros(num_layers, dtype=torch.float64)
    if freeze_layers:
        l = torch.arange(1, freeze_layers + 1, dtype=torch.float64)
        p[:freeze_layers] = (freeze_layers + 1 - l) / freeze_layers
    return p


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
    """HF ``Trainer`` callback: at each optimizer step, freeze each of the lowest
    ``freeze_layers`` encoder layers l with probability ``p_l`` (:func:`freeze_probabilities`).

    At ``on_step_begin`` a fresh draw sets ``requires_grad=False`` on the frozen layers'
    parameters (so backward skips their weight gradients) and restores the others; at
    ``on_pre_optimizer_step`` any gradient left on a frozen parameter is dropped, so the
    optimizer (Adam moments and weight decay included, since PyTorch optimizers skip
    parameters without a gradient) leaves them untouched. At ``on_train_end`` every
    parameter gets its ``requires_grad`` from before training back.

    Args:
        freeze_layers: L, how many of the lowest layers may be frozen (the paper tunes it in
            {0, 1, 2, 3}; 0 never freezes).
        model: the model to freeze in (default: the ``model`` Trainer passes to callbacks).
        seed: seed of the callback's own generator (draws do not disturb the global RNG).

    Attributes:
        probabilities: float64 [n], every encoder layer's freezing probability.
        frozen: bool [n], this step's draw (None before the first step).
    """

    def __init__(self, freeze_layers: int, model: Optional[nn.Module] = None, seed: int = 0):
        if isinstance(freeze_layers, bool) or not isinstance(freeze_layers, int) or freeze_layers < 0:
            raise ValueError(f"LayerFreezingCallback: freeze_layers must be an integer >= 0, got {freeze_layers!r}")
        self.freeze_layers = freeze_layers
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
        """One draw for an encoder of ``num_layers`` layers: bool [num_layers], True for the
        layers frozen this step."""
        self.probabilities = freeze_probabilities(num_layers, self.freeze_layers)
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
