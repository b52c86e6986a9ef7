"""Wan2.2 A14B expert pairs in training: one LoRA trained across the high- and low-noise experts.

The experts are two DiTs of one architecture. The LoRA network is built on the low-noise expert and
`share_network` builds a second one on the high-noise expert whose modules hold the *same* down/up layers and alpha:
one set of LoRA weights is patched into both experts (the optimizer, the saved file and the training state see it
once) while the base weights differ. Per batch the drawn timesteps pick the expert: `training.step.draw_sigmas` puts
every sample of a batch on one side of the boundary and `ExpertPair.select` returns that side's DiT (the high-noise
expert for timesteps t >= boundary * 1000, the rule of `wan_core.sampling.experts`).

With `offload` only the active expert's weights are on the training device; the other waits in CPU memory and the
two are exchanged when the expert changes (the LoRA weights stay on the device).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from wan_core.lora.network import LoRANetwork
from wan_core.models.dit import WanModel
from wan_core.sampling.experts import HIGH, LOW, expert_for
from wan_core.sampling.solvers import NUM_TRAIN_TIMESTEPS

logger = logging.getLogger(__name__)


def expert_of(sigmas: torch.Tensor, boundary: float) -> str:
    """HIGH or LOW for noise levels σ [B] on one side of `boundary` (0..1), judged on the model timesteps
    1000·σ as the DiT gets them (float32); ValueError when they lie on both sides."""
    t = (sigmas.double() * NUM_TRAIN_TIMESTEPS).float()
    low, high = expert_for(float(t.min()), boundary), expert_for(float(t.max()), boundary)
    if low != high:
        raise ValueError(f"the timesteps {t.tolist()} lie on both sides of the expert boundary {boundary * 1000:g}; "
                         f"a batch runs through one expert")
    return high


@dataclass
class ExpertPair:
    """The low- and high-noise DiTs of a training run; `select(σ)` returns the one the timesteps pick."""

    low: WanModel
    high: WanModel
    boundary: float  # fraction 0..1
    device: torch.device
    offload: bool = False
    active: str = LOW  # the low-noise expert starts on the device
    switches: int = 0

    def __post_init__(self) -> None:
        if self.low.config != self.high.config:
            raise ValueError(f"--dit and --dit_high_noise must have one architecture, got {self.low.config} and "
                             f"{self.high.config}")

    def model(self, name: str) -> WanModel:
        return self.high if name == HIGH else self.low

    def select(self, sigmas: torch.Tensor) -> WanModel:
        return self.activate(expert_of(sigmas, self.boundary))

    def activate(self, name: str) -> WanModel:
        """Make `name` the active expert (with `offload`: its weights to the device, the other's to the CPU)."""
        if name != self.active:
            if self.offload:
                self.model(self.active).to("cpu")
                self.model(name).to(self.device)
            logger.debug("switching to the %s-noise expert", name)
            self.active = name
            self.switches += 1
        return self.model(name)

    def place(self) -> None:
        """With `offload`: the active expert's weights on the device and the other's in CPU memory again (after
        something else, e.g. sampling previews, moved them)."""
        if self.offload:
            other = LOW if self.active == HIGH else HIGH
            self.model(other).to("cpu")
            self.model(self.active).to(self.device)

    def modules(self) -> tuple[WanModel, WanModel]:
        return self.low, self.high


def share_network(network: LoRANetwork, model: WanModel) -> LoRANetwork:
    """A LoRA network on `model` whose modules share `network`'s down/up layers and alpha (same names, ranks)."""
    ranks = {name: module.rank for name, module in network.by_name.items()}
    alphas = {name: float(module.alpha) for name, module in network.by_name.items()}
    shadow = LoRANetwork(model, network.rank, network.alpha_value, network.dropout, network.rank_dropout,
                         network.module_dropout, include_patterns=[".*"], exclude_patterns=[],
                         multiplier=network.multiplier, ranks=ranks, alphas=alphas)
    if set(shadow.by_name) != set(ranks):
        shadow.remove()
        missing = sorted(set(ranks) - set(shadow.by_name))
        raise ValueError(f"the high-noise expert lacks {len(missing)} LoRA target layers of the low-noise expert "
                         f"(e.g. {', '.join(missing[:3])})")
    for name, module in shadow.by_name.items():
        source = network.by_name[name]
        module.lora_down, module.lora_up, module.alpha = source.lora_down, source.lora_up, source.alpha
        module.scale = source.scale
    shadow.train(network.training)
    return shadow
