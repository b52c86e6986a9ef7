"""Multi-process inference on the CPU (gloo): sequence parallel (Ulysses, ring, both), CFG parallel and FSDP give the
single-process result to float32 rounding, for T2V, I2V, FLF2V, Wan2.2 TI2V (per-token timesteps) and an expert
pair, alone and with block swap, fp8 and a LoRA; bad layouts are refused before anything loads.

One spawned worker group per world size (2 and 4 processes) runs every case of that size; the parent computes the
single-process float32 and float64 references. Tolerances come from `tests.numerics`: a parallel result must be as
close to the float64 run as MARGIN x the single-process run's own float32 error allows. Where no float64 run of the
exact model exists (fp8 weights), both float32 runs are within that bound of the float64 run of the unquantised
model's arithmetic, so they differ by at most twice the bound (fp8 weights are dequantised to float32 before every
matmul: the same float32 operations as the unquantised model). A denoising run's reference uses a float64 copy of
the DiT; the sampler keeps its state in float32 there as in the runs compared, so the bound measures what the
DiT's float32 rounding does to the sampled latents.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.numerics import assert_float32_parity, float32_tolerance, float64_copy, float64_upcasts, rel_err
from tests.tiny import TINY_DIT, TINY_DIT_BY_TYPE, randomize_
from wan_core.models.dit import WanModel
from wan_core.parallel import CfgParallel, ParallelConfig, SequenceParallel, build_mesh
from wan_core.parallel.fsdp import local_weight_bytes, shard_blocks
from wan_core.parallel.sequence import block_attention, merge_partials
from wan_core.runtime.fp8 import apply_fp8
from wan_core.runtime.offload import enable_block_swap
from wan_core.sampling import conditioning as cond
from wan_core.sampling.experts import ExpertSwitch
from wan_core.sampling.pipeline import SamplerSettings, denoise

TI2V = dataclasses.replace(TINY_DIT, in_dim=48, out_dim=48)
GRID = (3, 2, 6)  # latent frames, height, width: 3 x 1 x 3 = 9 tokens, not a multiple of 2 or 4 (padding)
SETTINGS = SamplerSettings(steps=3, guidance_scale=4.0, flow_shift=3.0, seed=7)


# ------------------------------------------------------------------------------------------------ shared inputs


def _rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tiny_model(cfg=TINY_DIT, seed: int = 0) -> WanModel:
    return randomize_(WanModel(cfg), seed).eval().requires_grad_(False)


def forward_inputs(kind: str) -> tuple[WanModel, dict]:
    """A tiny model of `kind` and the keyword inputs of one forward."""
    cfg = TI2V if kind == "ti2v" else TINY_DIT_BY_TYPE[kind]
    model = tiny_model(cfg, seed=len(kind))
    f, h, w = GRID
    tokens = f * (h // 2) * (w // 2)
    x = _rand(1, 1, 16 if kind != "ti2v" else 48, f, h, w)
    inputs: dict = {"x": x, "t": torch.tensor([613.0]), "context": [_rand(2, 5, cfg.text_dim)]}
    if kind == "ti2v":  # Wan2.2 image-to-video: the first frame's tokens at t = 0
        inputs["t"] = torch.cat([torch.zeros(tokens // f), torch.full((tokens - tokens // f,), 613.0)])[None]
    if cfg.has_image_input:
        inputs["y"] = _rand(3, 1, cfg.in_dim - 16, f, h, w)
        inputs["clip_fea"] = _rand(4, 1, cfg.image_tokens, cfg.clip_dim)
    return model, inputs


def denoise_inputs() -> dict:
    return {"cond": cond.text_to_video(8 * GRID[1], 8 * GRID[2], 4 * GRID[0] - 3),
            "context": [_rand(5, 6, TINY_DIT.text_dim)], "negative_context": [_rand(6, 4, TINY_DIT.text_dim)]}


def expert_pair() -> ExpertSwitch:
    return ExpertSwitch(tiny_model(seed=11), tiny_model(seed=12), boundary=0.9, guidance_high=3.0, guidance_low=4.0,
                        device=torch.device("cpu"))


def fp8(model: WanModel) -> WanModel:
    return apply_fp8(model, "fp8_scaled", device="cpu")


def with_swap(model: WanModel) -> WanModel:
    model.block_swapper = enable_block_swap(model, 1, "cpu")
    return model


# Forward cases: name -> (model kind, ulysses, ring, model transform); world = ulysses x ring
FORWARD: dict[int, dict[str, tuple[str, int, int, Callable[[WanModel], WanModel] | None]]] = {
    2: {"t2v ulysses 2": ("t2v", 2, 1, None), "t2v ring 2": ("t2v", 1, 2, None), "i2v ulysses 2": ("i2v", 2, 1, None),
        "flf2v ring 2": ("flf2v", 1, 2, None), "ti2v-5B ulysses 2": ("ti2v", 2, 1, None),
        "t2v ulysses 2 + block swap": ("t2v", 2, 1, with_swap), "t2v ulysses 2 + fp8": ("t2v", 2, 1, fp8),
        "i2v ring 2 + fsdp": ("i2v", 1, 2, None)},
    4: {"t2v ulysses 2 x ring 2": ("t2v", 2, 2, None), "t2v ulysses 4": ("t2v", 4, 1, None),
        "flf2v ring 4": ("flf2v", 1, 4, None), "ti2v-5B ulysses 2 x ring 2": ("ti2v", 2, 2, None)},
}
# Denoising cases: name -> (ulysses, ring, cfg parallel, expert pair)
DENOISE = {2: {"t2v cfg parallel": (1, 1, True, False), "expert pair ulysses 2": (2, 1, False, True)},
           4: {"t2v cfg parallel x ulysses 2": (2, 1, True, False),
               "expert pair cfg parallel x ring 2": (1, 2, True, True)}}


# ------------------------------------------------------------------------------------------------ the workers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_forward_case(name: str, spec: tuple, world: int) -> tuple[torch.Tensor, int]:
    kind, u, r, transform = spec
    model, inputs = forward_inputs(kind)
    model = transform(model) if transform else model
    mesh = build_mesh(ParallelConfig(u, r, dit_fsdp="fsdp" in name), torch.device("cpu"))
    if "fsdp" in name:
        whole = local_weight_bytes(model)
        shard_blocks(model, mesh)
        assert local_weight_bytes(model) < 0.75 * whole  # each rank holds about 1/world of the weights
    sp = SequenceParallel(model, mesh)
    with torch.no_grad():
        out = model(**inputs)
    plan = sp.plan
    assert plan is not None and plan.chunk * world >= plan.tokens > plan.chunk  # the tokens really were split
    return out, plan.chunk


def _run_denoise_case(spec: tuple) -> torch.Tensor:
    u, r, cfg_parallel, experts = spec
    mesh = build_mesh(ParallelConfig(u, r, cfg_parallel), torch.device("cpu"))
    dit = expert_pair() if experts else tiny_model(seed=9)
    for model in (dit.experts.values() if isinstance(dit, ExpertSwitch) else [dit]):
        if mesh.config.sp_size > 1:
            SequenceParallel(model, mesh)
    cfg = CfgParallel(mesh) if cfg_parallel else None
    out = denoise(dit, settings=SETTINGS, wrap_predict=cfg.wrap if cfg else None, **denoise_inputs())
    if cfg is not None:  # one forward per step on each rank instead of two
        assert cfg.forwards == SETTINGS.steps
    return out


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for name, spec in FORWARD[world].items():
        results[name], results[name + " chunk"] = _run_forward_case(name, spec, world)
    for name, spec in DENOISE[world].items():
        results[name] = _run_denoise_case(spec)
    results["cli"] = _run_cli(Path(out) / f"cli{rank}", CLI_FLAGS[world])
    torch.save(results, Path(out) / f"rank{rank}.pt")


# ------------------------------------------------------------------------------------------------ the CLI


CLI_BASE = ["--prompt", "a purple cube", "--seed", "3", "--infer_steps", "3", "--video_size", "16", "48",
            "--video_length", "9", "--output_type", "latent", "--quiet", "--lora_weight"]
CLI_FLAGS = {2: ["--ulysses_size", "2", "--blocks_to_swap", "1"],
             4: ["--ring_size", "2", "--cfg_parallel", "--dit_fsdp", "--t5_fsdp"]}


def _run_cli(save: Path, flags: list[str]) -> torch.Tensor | None:
    """The toy model set through `python -m wan_core.generate` with the toy LoRA; the latents rank 0 wrote."""
    from safetensors.torch import load_file

    from wan_core.generate.cli import main
    from wan_core.loading.model_set import toy_path

    assert main([*CLI_BASE, str(toy_path("lora")), "--save_path", str(save), *flags]) == 0
    files = sorted(save.glob("*_latent.safetensors")) if save.exists() else []
    return load_file(str(files[0]))["latent"] if files else None


def _cli_references(tmp: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-process CLI latents and the same run with a float64 copy of the DiT."""
    from wan_core.generate import cli
    from wan_core.loading.model_set import ModelSet, toy_path

    args = cli.build_parser().parse_args([*CLI_BASE, str(toy_path("lora")), "--save_path", str(tmp)])
    spec = cli.spec_from_args(args)
    models = ModelSet(spec)
    jobs = cli.jobs_from_lines(cli.prompt_lines(args), args, spec)
    embeds = cli.encode_job_prompts(models, jobs, keep_loaded=True)
    conds = cli.build_job_conditioning(models, jobs, keep_loaded=True)
    ref32 = cli.denoise_jobs(models, jobs, conds, embeds, quiet=True, keep_loaded=True)[0]
    models._models["dit"] = float64_copy(models.get("dit"))
    with float64_upcasts():
        ref64 = cli.denoise_jobs(models, jobs, conds, {k: v.double() for k, v in embeds.items()}, quiet=True,
                                 keep_loaded=True)[0]
    return ref32, ref64


# ------------------------------------------------------------------------------------------------ the tests


def _spawn(world: int, out: Path) -> list[dict]:
    mp.start_processes(_worker, args=(world, _free_port(), str(out)), nprocs=world, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


def _forward_references(kind: str, transform) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(float32 output of the case's model, float32 and float64 outputs of its unquantised model)."""
    model, inputs = forward_inputs(kind)
    with torch.no_grad():
        plain32 = model(**inputs)
        with float64_upcasts():
            plain64 = float64_copy(model)(**{k: _double(v) for k, v in inputs.items()})
        case32 = transform(copy.deepcopy(model))(**inputs) if transform else plain32
    return case32, plain32, plain64


def _double(v):
    if isinstance(v, list):
        return [t.double() for t in v]
    return v.double() if v.is_floating_point() else v


def _denoise_references(experts: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dit = expert_pair() if experts else tiny_model(seed=9)
    ref32 = denoise(dit, settings=SETTINGS, **denoise_inputs())
    if isinstance(dit, ExpertSwitch):
        dit.experts = {k: float64_copy(m) for k, m in dit.experts.items()}
    else:
        dit = float64_copy(dit)
    inputs = denoise_inputs()
    with float64_upcasts():
        ref64 = denoise(dit, settings=SETTINGS, cond=inputs["cond"], context=[inputs["context"][0].double()],
                        negative_context=[inputs["negative_context"][0].double()])
    return ref32, ref64


FIGURES: list[str] = []


def _check(name: str, got: torch.Tensor, ref32: torch.Tensor, ref64: torch.Tensor,
           pair_bound: float | None = None) -> None:
    """`pair_bound`: compare with the one-process float32 run against this bound instead of with ref64."""
    diff = (got.double() - ref32.double()).abs().max().item()
    bound = float32_tolerance(ref32, ref64) if pair_bound is None else pair_bound
    FIGURES.append(f"{name}: max abs {diff:.3g}, rel {rel_err(got, ref32):.3g} vs one process (bound {bound:.3g})")
    if pair_bound is not None:
        assert rel_err(got, ref32) <= pair_bound, name
    else:  # ref64 of a denoising run: a float64 DiT under the sampler's float32 state, as in both float32 runs
        assert rel_err(got, ref64) <= float32_tolerance(ref32, ref64), name


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_parallel_runs_equal_one_process(world: int, tmp_path: Path) -> None:
    FIGURES.clear()
    ranks = _spawn(world, tmp_path)
    for name in [*FORWARD[world], *DENOISE[world]]:
        for rank, result in enumerate(ranks[1:], start=1):  # every rank ends with the whole result
            assert torch.equal(result[name], ranks[0][name]), (name, rank)
    for name, (kind, _u, _r, transform) in FORWARD[world].items():
        case32, plain32, plain64 = _forward_references(kind, transform)
        if transform is fp8:  # fp8 output vs the unquantised float64 run is the quantisation error: bound the pair
            _check(name, ranks[0][name], case32, plain64, pair_bound=2 * float32_tolerance(plain32, plain64))
        else:
            assert_float32_parity(case32, plain32, plain64)
            _check(name, ranks[0][name], case32, plain64)
    for name, (_u, _r, _cfg, experts) in DENOISE[world].items():
        _check(name, ranks[0][name], *_denoise_references(experts))
    assert all(r["cli"] is None for r in ranks[1:])  # only rank 0 writes
    _check(f"CLI {' '.join(CLI_FLAGS[world])} + LoRA", ranks[0]["cli"], *_cli_references(tmp_path / "single"))
    print("\n".join(FIGURES), file=sys.stderr)


# ------------------------------------------------------------------------------------------------ one process


def test_ring_merge_equals_attention_over_all_keys() -> None:
    q, k, v = _rand(1, 1, 5, 2, 8), _rand(2, 1, 7, 2, 8), _rand(3, 1, 7, 2, 8)
    whole = torch.nn.functional.scaled_dot_product_attention(*(a.double().transpose(1, 2) for a in (q, k, v)))
    out, lse = block_attention(q, k[:, :3], v[:, :3])
    out, lse = merge_partials(out, lse, *block_attention(q, k[:, 3:], v[:, 3:]))
    assert rel_err(out, whole.transpose(1, 2)) < 64 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize(("config", "world", "message"), [
    (ParallelConfig(2, 1), 4, "--ulysses_size 2 x --ring_size 1 x 1 (without --cfg_parallel) = 2 must equal the "
                              "number of processes (4"),
    (ParallelConfig(2, 2, cfg_parallel=True), 4, "x 2 (with --cfg_parallel) = 8"),
])
def test_layout_must_match_the_number_of_processes(config: ParallelConfig, world: int, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.check_world(world)


def test_heads_must_divide_by_ulysses_size() -> None:
    with pytest.raises(ValueError, match="--ulysses_size 3 does not divide the DiT's 4 attention heads; use a "
                                         "divisor .1, 2, 4. and put the other factor in --ring_size"):
        ParallelConfig(3).check_heads(4)
    ParallelConfig(2, 3).check_heads(4)


@pytest.mark.parametrize(("flags", "world", "message"), [
    (["--ulysses_size", "2"], "1", "= 2 must equal the number of processes .1; torchrun --nproc_per_node."),
    (["--ulysses_size", "0"], "1", "--ulysses_size must be an integer >= 1, got 0"),
    (["--ring_size", "2", "--dit_fsdp", "--blocks_to_swap", "2"], "2",
     "--dit_fsdp shards the DiT's weights .* --blocks_to_swap 2"),
    (["--cfg_parallel", "--cache_mode", "teacache"], "2", "--cache_mode teacache .* cannot be combined with "
                                                          "--cfg_parallel"),
    (["--ulysses_size", "2", "--interactive"], "2", "--interactive runs in one process"),
])
def test_cli_refuses_bad_layouts_before_loading(flags: list[str], world: str, message: str, capsys, monkeypatch,
                                                tmp_path: Path) -> None:
    from wan_core.generate import cli

    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setattr(cli.ModelSet, "get", lambda *a: pytest.fail("a model was loaded"))
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("a process group was joined"))
    assert cli.main(["--prompt", "x", "--save_path", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
