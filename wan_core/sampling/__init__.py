"""Sampling: the flow-matching solvers and schedules, classifier-free guidance (CFG skip, SLG), the conditioning of
each task (T2V, I2V, FLF2V, Fun-Control) and the denoising pipeline."""
