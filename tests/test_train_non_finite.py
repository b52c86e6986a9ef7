"""A NaN/inf loss or NaN/inf trained weights stop training with a message naming the step, the items and the last
good checkpoint; no file with NaN/inf values is ever written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.tiny_training import memory_source, tiny_dit_file, train_args
from training import state as st
from training.train import NonFiniteTrainingError, train
from wan_core.loading.checkpoint import NonFiniteError, non_finite_count


@pytest.fixture(scope="module")
def dit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_dit_file(tmp_path_factory.mktemp("dit") / "tiny_t2v.safetensors")


def _written_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{path.relative_to(folder)}:{key}": value for path in folder.rglob("*.safetensors")
            for key, value in load_file(str(path)).items()}


def _expected_last_good(out: Path, done: int, every: int) -> str:
    saved = done - done % every
    return f"last good checkpoint: {out / st.step_file('lora', saved)}" if saved else \
        "last good checkpoint: none saved yet"


def test_huge_learning_rate_stops_naming_step_items_and_last_checkpoint(dit: Path, tmp_path: Path) -> None:
    steps: list[int] = []
    args = train_args(dit, tmp_path, "--learning_rate", "1e4", "--max_train_steps", "20", "--save_every_n_steps",
                      "2", "--save_state")
    with pytest.raises(NonFiniteTrainingError) as error:
        train(args, source=memory_source(3), on_step=lambda step, total, loss: steps.append(step))
    message = str(error.value)
    assert "\n" not in message and len(steps) < 20
    assert f"training stopped at step {len(steps) + 1} (epoch " in message
    assert re.search(r"the loss is (nan|inf) for item '\d' \(loss (nan|inf)\)", message), message
    assert _expected_last_good(tmp_path, len(steps), 2) in message
    assert "lower --learning_rate" in message
    assert not (tmp_path / "lora.safetensors").exists()
    written = _written_tensors(tmp_path)
    assert written and all(non_finite_count(value) == 0 for value in written.values())


class InfAfterTwoSteps(torch.optim.SGD):
    """SGD whose second step leaves inf in one weight (a loss that is still finite)."""

    def step(self, closure=None):  # type: ignore[override]
        result = super().step(closure)
        self.steps = getattr(self, "steps", 0) + 1
        if self.steps == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return result


def test_non_finite_weights_after_an_optimizer_step_stop_the_run(dit: Path, tmp_path: Path) -> None:
    args = train_args(dit, tmp_path, "--optimizer_type", f"{__name__}.InfAfterTwoSteps", "--max_train_steps", "5",
                      "--save_every_n_steps", "1")
    expected = (r"at step 2 \(epoch 1\): the optimizer step left NaN/inf values in 1 trained tensor\(s\) \(first: "
                r"lora_unet_.*\) although the loss was finite; last good checkpoint: .*lora-step00000001")
    with pytest.raises(NonFiniteTrainingError, match=expected):
        train(args, source=memory_source(3))
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["lora-step00000001.safetensors"]


def test_state_saves_refuse_non_finite_weights(tmp_path: Path) -> None:
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    weights = {"w": torch.tensor([1.0, float("nan"), 2.0])}
    with pytest.raises(NonFiniteError, match=r"lora-state \(not written\): tensor 'w' holds 1 NaN/inf"):
        st.save_state(tmp_path / "lora-state", st.TrainingObjects(weights, optimizer, scheduler), st.Progress(), {})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("network", [[], ["--network_module", "full"]])
def test_checkpoint_saves_refuse_non_finite_weights(network: list[str], dit: Path, tmp_path: Path,
                                                    monkeypatch) -> None:
    """With the per-step weight check off, the save itself refuses (and writes nothing), LoRA and full DiT."""
    import training.train as train_module

    monkeypatch.setattr(train_module, "check_weights", lambda *args: None)
    args = train_args(dit, tmp_path, "--optimizer_type", f"{__name__}.InfAfterTwoSteps", "--max_train_steps", "5",
                      "--save_every_n_steps", "2", "--save_state", *network)
    name = "dit" if network else "lora"
    with pytest.raises(NonFiniteError, match=rf"{name}-step00000002.safetensors \(not written\): tensor '"):
        train(args, source=memory_source(3))
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []


def test_resume_refuses_a_state_with_non_finite_weights(dit: Path, tmp_path: Path) -> None:
    train(train_args(dit, tmp_path, "--max_train_steps", "2", "--save_state"), source=memory_source(2))
    weights = tmp_path / "lora-state" / st.STATE_WEIGHTS
    tensors = load_file(str(weights))
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(weights))
    args = train_args(dit, tmp_path / "again", "--max_train_steps", "4", "--resume", str(tmp_path / "lora-state"))
    with pytest.raises(NonFiniteError, match=rf"--resume .*{st.STATE_WEIGHTS}: tensor '{key}'"):
        train(args, source=memory_source(2))
