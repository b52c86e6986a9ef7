"""Sharded training (FSDP2) on the CPU: two gloo processes with the repository's accelerate FSDP config train the
tiny DiT (a LoRA on the sharded DiT, and the full DiT); their loss curves and saved weights equal one process
trained on the combined batches to float32 rounding, and a sharded run resumed from a saved state ends bit-equal to
the uninterrupted run.

The tolerance is the numerics one (`tests.numerics`): the single-process reference is also run entirely in float64
(weights and LoRA cast to float64 after they are made, `float64_upcasts`), and the sharded float32 result must be
within MARGIN x the reference's own float32-vs-float64 error of the float64 result.

The ranks are spawned (fresh interpreters), as in test_train_ddp. The environment of each rank is what
`accelerate launch --config_file configs/accelerate/fsdp_2gpu.yaml` exports, built by accelerate's own launcher code
from the config file.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import training.train as train_module
from tests.numerics import assert_float32_parity, float32_tolerance, float64_upcasts, rel_err
from tests.test_train_ddp import CombinedSource
from tests.tiny_training import memory_source, tiny_dit_file, train_args
from training import sharding
from training.train import train
from wan_core.models.config import CONFIG_METADATA_KEY

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "accelerate"
WORLD = 2
# SGD with momentum: Adam's normalisation would blow float rounding up for near-zero gradient entries.
FLAGS = ("--max_train_steps", "4", "--gradient_accumulation_steps", "2", "--max_grad_norm", "0.5",
         "--timestep_sampling", "sigmoid", "--lr_scheduler", "linear", "--lr_warmup_steps", "1",
         "--optimizer_type", "SGD", "--optimizer_args", "momentum=0.9", "--learning_rate", "0.05")
FULL = ("--network_module", "full")
RESUME_AT = 2


def launch_env(config: Path, num_processes: int = WORLD) -> dict[str, str]:
    """The accelerate/FSDP variables `accelerate launch --config_file config` gives each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "--num_processes", str(num_processes),
                                               "--mixed_precision", "no", "script.py"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_USE_", "FSDP_"))}


# ----------------------------------------------------------------------------------------------------------------
# Configuration (fast)
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["fsdp_2gpu.yaml", "fsdp_8gpu.yaml"])
def test_the_repository_configs_ask_for_fsdp2(name: str) -> None:
    env = launch_env(CONFIGS / name)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert sharding.sharding_from_env(env) == sharding.ShardingConfig(reshard_after_forward=True)
    assert sharding.sharding_from_env({**env, "FSDP_RESHARD_AFTER_FORWARD": "false"}) == \
        sharding.ShardingConfig(reshard_after_forward=False)
    assert sharding.sharding_from_env({}) is None


@pytest.mark.parametrize(("variable", "value", "option"), [
    ("FSDP_VERSION", "1", "fsdp_version: 1"),
    ("FSDP_OFFLOAD_PARAMS", "true", "fsdp_offload_params: true"),
    ("FSDP_CPU_RAM_EFFICIENT_LOADING", "true", "fsdp_cpu_ram_efficient_loading: true"),
    ("FSDP_ACTIVATION_CHECKPOINTING", "true", "fsdp_activation_checkpointing: true"),
    ("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT", "fsdp_state_dict_type: SHARDED_STATE_DICT"),
    ("FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP", "fsdp_auto_wrap_policy: SIZE_BASED_WRAP"),
    ("FSDP_TRANSFORMER_CLS_TO_WRAP", "Block", "fsdp_transformer_layer_cls_to_wrap: Block"),
    ("FSDP_IGNORED_MODULES", "head", "fsdp_ignored_modules: head"),
    ("FSDP_RESHARD_AFTER_FORWARD", "FULL_SHARD", "fsdp_reshard_after_forward: full_shard"),
    ("ACCELERATE_USE_DEEPSPEED", "true", "distributed_type: DEEPSPEED"),
])
def test_unsupported_fsdp_options_are_refused_by_name(variable: str, value: str, option: str) -> None:
    env = {**launch_env(CONFIGS / "fsdp_2gpu.yaml"), variable: value}
    with pytest.raises(ValueError, match=option) as info:
        sharding.sharding_from_env(env)
    assert "\n" not in str(info.value)


def test_an_fsdp_config_with_one_process_is_refused_before_loading(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in launch_env(CONFIGS / "fsdp_2gpu.yaml", num_processes=1).items():
        monkeypatch.setenv(key, value)
    dit = tiny_dit_file(tmp_path / "dit.safetensors")
    monkeypatch.setattr(train_module, "load_model", lambda run: pytest.fail("the DiT was loaded"))
    with pytest.raises(ValueError, match=r"needs 2 or more processes \(num_processes\), got 1") as info:
        train(train_args(dit, tmp_path / "out", *FLAGS), source=memory_source(8))
    assert "\n" not in str(info.value)


NO_PROBLEM = {"fp8": False, "blocks_to_swap": None, "given_model": False, "previews": False, "validation": False,
              "expert_pair": False}


@pytest.mark.parametrize(("setting", "named"), [({"fp8": True}, "--fp8_base"),
                                                ({"blocks_to_swap": 1}, "--blocks_to_swap"),
                                                ({"given_model": True}, "a DiT loaded by the caller"),
                                                ({"previews": True}, "--sample_prompts"),
                                                ({"validation": True}, "--validation_split"),
                                                ({"expert_pair": True}, "--dit_high_noise")])
def test_settings_a_sharded_run_cannot_do_are_named(setting: dict, named: str) -> None:
    sharding.check_sharded_run(2, **NO_PROBLEM)
    with pytest.raises(ValueError, match=re.escape(named)):
        sharding.check_sharded_run(2, **{**NO_PROBLEM, **setting})


# ----------------------------------------------------------------------------------------------------------------
# Two processes against one (slow)
# ----------------------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keep(result: train_module.TrainResult, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in result.weights.items()}, str(path))
    torch.save([loss for _, loss in result.losses], path.with_suffix(".losses"))


def _worker(rank: int, port: int, env: dict[str, str], dit: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), **env)
    torch.set_num_threads(1)
    root, dit_path = Path(out), Path(dit)
    build = train_module.build_optimizer
    held: list[float] = []  # the share of the DiT's numbers this process holds, per run

    def build_recording(run: train_module.Run, trainable: train_module.Trainable, data: train_module.Data):
        params = list(trainable.model.parameters())
        assert all(sharding.is_sharded(p) for p in params)
        held.append(sum(p.to_local().numel() for p in params) / sum(p.numel() for p in params))
        return build(run, trainable, data)

    train_module.build_optimizer = build_recording
    flags = (*FLAGS, "--ddp_timeout", "3")  # minutes: a stuck collective fails the test instead of hanging it
    lora = train(train_args(dit_path, root / "lora", *flags), source=memory_source(8))
    _keep(lora, root / f"lora_rank{rank}.safetensors")
    state_flags = ("--save_state", "--save_every_n_steps", str(RESUME_AT))
    full = train(train_args(dit_path, root / "full", *flags, *FULL, *state_flags), source=memory_source(8))
    _keep(full, root / f"full_rank{rank}.safetensors")
    resumed = train(train_args(dit_path, root / "resumed", *flags, *FULL, *state_flags, "--resume",
                               str(root / "full" / f"dit-step{RESUME_AT:08d}-state")), source=memory_source(8))
    assert [step for step, _ in resumed.losses] == list(range(RESUME_AT + 1, 5))
    torch.save(held, root / f"held_rank{rank}.pt")


def _single(dit: Path, out: Path, flags: tuple[str, ...], float64: bool,
            monkeypatch: pytest.MonkeyPatch) -> train_module.TrainResult:
    """One process on the combined batches; with `float64` the DiT and LoRA are cast to float64 once made."""
    apply = train_module.apply_lora

    def apply_float64(run: train_module.Run, model: torch.nn.Module) -> train_module.Trainable:
        trainable = apply(run, model)
        model.double()
        if trainable.network is not None:
            trainable.network.double()
        return trainable

    with monkeypatch.context() as patch:
        if float64:
            patch.setattr(train_module, "apply_lora", apply_float64)
        with float64_upcasts() if float64 else contextlib.nullcontext():
            return train(train_args(dit, out, *FLAGS, *flags), source=CombinedSource(memory_source(8)))


def _check_parity(name: str, sharded: dict[str, torch.Tensor], losses: list[float], ref32: train_module.TrainResult,
                  ref64: train_module.TrainResult) -> None:
    assert sorted(sharded) == sorted(ref32.weights)
    got_losses = torch.tensor(losses, dtype=torch.float64)
    want32 = torch.tensor([v for _, v in ref32.losses], dtype=torch.float64)
    want64 = torch.tensor([v for _, v in ref64.losses], dtype=torch.float64)
    assert_float32_parity(got_losses, want32, want64)
    worst, used = 0.0, 0.0
    for key, value in sharded.items():
        assert value.dtype == torch.float32, key
        assert_float32_parity(value, ref32.weights[key], ref64.weights[key].double())
        err = rel_err(value, ref64.weights[key])
        worst, used = max(worst, err), max(used, err / float32_tolerance(ref32.weights[key], ref64.weights[key]))
    print(f"{name}: losses rel err {rel_err(got_losses, want64):.3g} (float32 reference "
          f"{rel_err(want32, want64):.3g}); weights worst rel err {worst:.3g} over {len(sharded)} tensors, at most "
          f"{used:.2f} of the tolerance")


@pytest.mark.slow
def test_two_process_fsdp_equals_one_process_and_resumes_exactly(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    started = time.time()
    dit = tiny_dit_file(tmp_path / "dit.safetensors")
    out = tmp_path / "fsdp"
    out.mkdir()
    env = launch_env(CONFIGS / "fsdp_2gpu.yaml")
    mp.start_processes(_worker, args=(_free_port(), env, str(dit), str(out)), nprocs=WORLD, start_method="spawn")
    spawned = time.time() - started

    for rank in range(WORLD):  # each process held about half of the DiT in each of its 3 runs
        assert all(0.4 < share < 0.6 for share in torch.load(out / f"held_rank{rank}.pt")), rank
    for kind in ("lora", "full"):  # every process ends with the same full weights and loss curve
        ranks = [load_file(str(out / f"{kind}_rank{r}.safetensors")) for r in range(WORLD)]
        assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
        assert torch.load(out / f"{kind}_rank0.losses") == torch.load(out / f"{kind}_rank1.losses")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for kind, flags in (("lora", ()), ("full", FULL)):
            ref32 = _single(dit, tmp_path / f"{kind}32", flags, False, monkeypatch)
            ref64 = _single(dit, tmp_path / f"{kind}64", flags, True, monkeypatch)
            saved = load_file(str(out / f"{kind}_rank0.safetensors"))
            _check_parity(kind, saved, torch.load(out / f"{kind}_rank0.losses"), ref32, ref64)
            if kind == "full":  # the file written by the main process: the gathered DiT, in official names
                with safe_open(str(out / "full" / "dit.safetensors"), "pt") as f:
                    assert CONFIG_METADATA_KEY in f.metadata()
                written = load_file(str(out / "full" / "dit.safetensors"))
                assert sorted(written) == sorted(ref32.weights)
                assert all(torch.equal(written[k], saved[k]) for k in saved)
    finally:
        torch.set_num_threads(threads)
    assert not [p.name for p in (out / "full").iterdir() if p.name.startswith(".")]  # no temporary files left

    # save/resume of sharded state: the resumed run's final state equals the uninterrupted run's, bit for bit
    straight, resumed = out / "full" / "dit-state", out / "resumed" / "dit-state"
    weights_a = load_file(str(straight / "weights.safetensors"))
    weights_b = load_file(str(resumed / "weights.safetensors"))
    assert sorted(weights_a) == sorted(weights_b)
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    state_a = torch.load(straight / "state.pt", weights_only=True)["optimizer"]
    state_b = torch.load(resumed / "state.pt", weights_only=True)["optimizer"]
    assert state_a["param_groups"] == state_b["param_groups"]
    assert sorted(state_a["state"]) == sorted(weights_a)  # a momentum buffer for every DiT parameter, by name
    for key, entry in state_a["state"].items():
        assert entry.keys() == state_b["state"][key].keys()
        assert all(torch.equal(entry[n], state_b["state"][key][n]) for n in entry), key
    print(f"spawned ranks {spawned:.1f} s, total {time.time() - started:.1f} s")
