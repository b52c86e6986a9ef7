"""Optimizers and LR schedulers: the schedules equal transformers' / diffusers' `get_scheduler` step by step, and the
optimizer choices (named, class paths, --optimizer_args, missing packages, bad names) behave as documented."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from training.optim import (
    OptimizerConfig,
    SchedulerConfig,
    build_optimizer,
    build_scheduler,
    current_lrs,
    parse_kwargs,
)

LR = 1e-3
TOTAL = 50


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.ones(3))]


def _ours(cfg: SchedulerConfig, total: int = TOTAL) -> list[float]:
    built = build_optimizer(OptimizerConfig("AdamW", (), LR), _params())
    scheduler = build_scheduler(cfg, built, total, LR)
    lrs = []
    for _ in range(total + 5):
        lrs.append(scheduler.get_last_lr()[0])
        built.optimizer.step()
        scheduler.step()
    return lrs


def _reference(name: str, total: int = TOTAL, **kwargs) -> list[float]:
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(_params(), lr=LR)
    scheduler = get_scheduler(name, optimizer, num_training_steps=total, **kwargs)
    lrs = []
    for _ in range(total + 5):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


CASES = [
    ("constant", {}, {}),
    ("constant_with_warmup", {"warmup_steps": 7}, {"num_warmup_steps": 7}),
    ("linear", {"warmup_steps": 5}, {"num_warmup_steps": 5}),
    ("cosine", {"warmup_steps": 0.1}, {"num_warmup_steps": 5}),  # a ratio of the 50 steps
    ("cosine_with_restarts", {"warmup_steps": 4, "num_cycles": 3},
     {"num_warmup_steps": 4, "scheduler_specific_kwargs": {"num_cycles": 3}}),
    ("polynomial", {"warmup_steps": 6, "power": 2.0},
     {"num_warmup_steps": 6, "scheduler_specific_kwargs": {"power": 2.0}}),
    ("inverse_sqrt", {"warmup_steps": 8}, {"num_warmup_steps": 8}),
    ("cosine_with_min_lr", {"warmup_steps": 3, "min_lr_ratio": 0.1, "num_cycles": 1},
     {"num_warmup_steps": 3, "scheduler_specific_kwargs": {"min_lr_rate": 0.1, "num_cycles": 0.5}}),
    ("warmup_stable_decay", {"warmup_steps": 5, "decay_steps": 0.4, "min_lr_ratio": 0.05},
     {"num_warmup_steps": 5, "scheduler_specific_kwargs": {"num_decay_steps": 20, "min_lr_ratio": 0.05}}),
]


@pytest.mark.parametrize("name, ours, theirs", CASES, ids=[c[0] for c in CASES])
def test_schedules_match_transformers(name: str, ours: dict, theirs: dict) -> None:
    pytest.importorskip("transformers")
    expected = _reference(name, **theirs)
    got = _ours(SchedulerConfig(name=name, **ours))
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_piecewise_constant_matches_diffusers() -> None:
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(_params(), lr=LR)
    reference = get_scheduler("piecewise_constant", optimizer, step_rules="1:10,0.1:20,0.01:30,0.005")
    expected = []
    for _ in range(40):
        expected.append(reference.get_last_lr()[0])
        optimizer.step()
        reference.step()
    got = _ours(SchedulerConfig("piecewise_constant", scheduler_args=("step_rules='1:10,0.1:20,0.01:30,0.005'",)),
                total=35)
    assert got == pytest.approx(expected, rel=1e-12)


def test_scheduler_errors_and_class_path() -> None:
    built = build_optimizer(OptimizerConfig("AdamW", (), LR), _params())
    with pytest.raises(ValueError, match="unknown --lr_scheduler 'cosinus'"):
        build_scheduler(SchedulerConfig("cosinus"), built, 10, LR)
    with pytest.raises(ValueError, match="constant takes no warmup"):
        build_scheduler(SchedulerConfig("constant", warmup_steps=3), built, 10, LR)
    with pytest.raises(ValueError, match="needs --lr_scheduler_min_lr_ratio"):
        build_scheduler(SchedulerConfig("cosine_with_min_lr"), built, 10, LR)
    step = build_scheduler(SchedulerConfig(scheduler_type="StepLR", scheduler_args=("step_size=2", "gamma=0.5")),
                           built, 10, LR)
    assert isinstance(step, torch.optim.lr_scheduler.StepLR) and step.gamma == 0.5


def test_optimizer_args_and_named_optimizers() -> None:
    assert parse_kwargs(["weight_decay=0.01", "betas=0.9,0.99", "foreach=False", "name=abc"], "x") == {
        "weight_decay": 0.01, "betas": (0.9, 0.99), "foreach": False, "name": "abc"}
    with pytest.raises(ValueError, match="key=value"):
        parse_kwargs(["weight_decay"], "--optimizer_args")
    built = build_optimizer(OptimizerConfig("adamw", ("weight_decay=0.05", "betas=0.8,0.9"), LR), _params())
    assert isinstance(built.optimizer, torch.optim.AdamW)
    assert built.optimizer.defaults["weight_decay"] == 0.05 and built.optimizer.defaults["betas"] == (0.8, 0.9)
    assert built.name == "torch.optim.adamw.AdamW(weight_decay=0.05,betas=(0.8, 0.9))"
    sgd = build_optimizer(OptimizerConfig("SGD", ("momentum=0.9",), LR), _params())  # bare name: torch.optim
    assert isinstance(sgd.optimizer, torch.optim.SGD)
    path = build_optimizer(OptimizerConfig("torch.optim.RMSprop", (), LR), _params())
    assert isinstance(path.optimizer, torch.optim.RMSprop)


def test_prodigy_and_its_effective_lr() -> None:
    prodigyopt = pytest.importorskip("prodigyopt")
    built = build_optimizer(OptimizerConfig("Prodigy", ("d0=1e-4",), 1.0), _params())
    assert isinstance(built.optimizer, prodigyopt.Prodigy)
    scheduler = build_scheduler(SchedulerConfig(), built, 10, 1.0)
    assert current_lrs(built.optimizer, scheduler) == [pytest.approx(1e-4)]  # d·lr


def test_adafactor_is_transformers_with_relative_step() -> None:
    transformers = pytest.importorskip("transformers")
    params = _params()
    built = build_optimizer(OptimizerConfig("Adafactor", (), 1e-3), params)
    assert isinstance(built.optimizer, transformers.optimization.Adafactor) and built.adafactor_relative_step
    scheduler = build_scheduler(SchedulerConfig(), built, 10, 1e-3)
    assert scheduler.get_last_lr() == [1e-3]
    params[0].grad = torch.ones(3)
    built.optimizer.step()
    scheduler.step()
    state = built.optimizer.state[params[0]]
    expected = transformers.optimization.Adafactor._get_lr(built.optimizer.param_groups[0], state)
    assert scheduler.get_last_lr() == [pytest.approx(expected)]
    fixed = build_optimizer(OptimizerConfig("Adafactor", ("relative_step=False", "scale_parameter=False"), 1e-3),
                            _params())
    assert not fixed.adafactor_relative_step and fixed.optimizer.defaults["lr"] == 1e-3


def test_missing_package_and_unknown_optimizer_errors() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(RuntimeError, match="AdamW8bit.*needs the Python package 'bitsandbytes'.*pip install"):
            build_optimizer(OptimizerConfig("AdamW8bit", (), LR), _params())
    with pytest.raises(RuntimeError, match="needs the Python package 'nosuchpkg'"):
        build_optimizer(OptimizerConfig("nosuchpkg.Opt", (), LR), _params())
    with pytest.raises(ValueError, match="unknown optimizer 'AdamQ'.*torch.optim has no class"):
        build_optimizer(OptimizerConfig("AdamQ", (), LR), _params())
    with pytest.raises(ValueError, match="cannot build optimizer torch.optim.AdamW with --optimizer_args"):
        build_optimizer(OptimizerConfig("AdamW", ("momentum=0.9",), LR), _params())
