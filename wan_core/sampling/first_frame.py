"""Image-to-video by a known first latent frame (Wan2.2 TI2V-5B), as a wrapper around the sampler: the DiT's
forward knows nothing of it.

The start image's latent (Wan2.2 VAE) is latent frame 0 of the video. The initial noise of frame 0 is replaced by
it; the DiT is told timestep 0 on the tokens of frame 0 and the sampler's t on every other token (per-token
timesteps [B, L]); the model always sees the image latent in frame 0, and the returned latents carry it exactly.

The official loop puts the image latent back into frame 0 after every solver step. The solvers here are
element-wise in the latents (each position's update reads only that position's values), so what the solver keeps
in frame 0 between steps never reaches another frame: giving the model the image latent in frame 0 at every step,
and writing it into the result, is the same computation for every other frame, value for value.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from wan_core.sampling.solvers import Schedule, StepCallback, StepInfo, VelocityFn, sample


@dataclass(frozen=True)
class FirstFrame:
    """The image latent [1, C, 1, h, w] that latent frame 0 of the video holds."""

    latent: Tensor

    def __post_init__(self) -> None:
        if self.latent.dim() != 5 or self.latent.shape[0] != 1 or self.latent.shape[2] != 1:
            raise ValueError(f"the first-frame latent must be [1, C, 1, h, w], got {list(self.latent.shape)}")

    def check_fits(self, shape: tuple[int, ...]) -> None:
        """ValueError unless the image latent fits latents of `shape` [B, C, F, h, w]."""
        want = (shape[1], shape[3], shape[4])
        got = (self.latent.shape[1], self.latent.shape[3], self.latent.shape[4])
        if got != want:
            raise ValueError(f"the start image's latent has (channels, height, width) {got} but the video's latents "
                             f"have {want}: encode the image with the model's VAE at the video size")

    def put(self, x: Tensor) -> Tensor:
        """x [B, C, F, h, w] with latent frame 0 replaced by the image latent (a new tensor)."""
        out = x.clone()
        out[:, :, :1] = self.latent.to(device=out.device, dtype=out.dtype)
        return out

    def timesteps(self, t: Tensor, x: Tensor, patch_size: tuple[int, int, int]) -> Tensor:
        """t [B] (or one value) -> per-token t [B, L]: 0 on the tokens of latent frame 0, t elsewhere.

        L = F·(h/ph)·(w/pw) in the DiT's token order (frame-major), for latents x [B, C, F, h, w]."""
        pt, ph, pw = patch_size
        if pt != 1:
            raise ValueError(f"a first latent frame needs a DiT with temporal patch size 1, got {pt}")
        batch, _, frames, height, width = x.shape
        per_frame = (height // ph) * (width // pw)
        t = t.reshape(-1).expand(batch).to(torch.float32)  # [B]
        tokens = t[:, None].expand(batch, frames * per_frame).clone()  # [B, L]
        tokens[:, :per_frame] = 0.0
        return tokens

    def velocity(self, velocity: VelocityFn) -> VelocityFn:
        """The sampler's velocity function, evaluated with the image latent in frame 0."""

        def wrapped(x: Tensor, t: Tensor, i: int) -> Tensor:
            return velocity(self.put(x), t, i)

        return wrapped

    def callback(self, callback: StepCallback | None) -> StepCallback | None:
        """Progress reports that show frame 0 as the model saw it (the image latent)."""
        if callback is None:
            return None

        def wrapped(info: StepInfo) -> None:
            callback(replace(info, x=self.put(info.x), denoised=self.put(info.denoised)))

        return wrapped

    def sample(self, solver: str, velocity: VelocityFn, x: Tensor, schedule: Schedule,
               callback: StepCallback | None = None) -> Tensor:
        """`solvers.sample` from noise x whose frame 0 is replaced by the image latent; the result's frame 0 is
        the image latent."""
        self.check_fits(tuple(x.shape))
        out = sample(solver, self.velocity(velocity), self.put(x), schedule, callback=self.callback(callback))
        return self.put(out)
