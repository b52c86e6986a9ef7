"""The "looks right" gates of the toy world (training/toy/audit.py) on the shipped toy files.

The gates apply to files the recipe built for `audit.DESIGN_VERSION` (stamped in their metadata); files that predate
that design are skipped with the reason, so the gates switch on when files of the new design are shipped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.toy import audit
from wan_core.loading.checkpoint import load_state_dict, read_metadata, save_safetensors
from wan_core.loading.model_set import TOY_FILES, TOY_MODEL_DIR
from wan_core.models.vae import load_vae

VAE_FILE = TOY_MODEL_DIR / TOY_FILES["vae"]
DIT_FILE = TOY_MODEL_DIR / TOY_FILES["dit"]


def _require_design(path: Path) -> None:
    version = audit.design_version(path)
    if version < audit.DESIGN_VERSION:
        pytest.skip(f"{path.name} predates toy design {audit.DESIGN_VERSION} (stamped {version}): "
                    f"rebuild with python -m training.toy.recipe")


# Targets the shipped build does not meet yet (measured figures in wan_core/toy_models/README.md, "Does it look
# right?"). Each is a strict xfail: the test still runs and reports, and a rebuild that meets the target turns it into
# a failure until it is taken off this list.
OPEN_VAE_TARGETS: frozenset[str] = frozenset()
OPEN_T2V_TARGETS: frozenset[str] = frozenset()


def _params(targets: dict[str, tuple[float, float]], still_open: frozenset[str]) -> list:
    reason = "target not met by the shipped toy build yet (toy README, 'Does it look right?')"
    return [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=reason)) if name in still_open else name
            for name in targets]


@pytest.fixture(scope="module")
def vae_figures() -> dict[str, object]:
    _require_design(VAE_FILE)
    return audit.audit_vae(load_vae(VAE_FILE), seeds=1)


@pytest.fixture(scope="module")
def t2v_figures() -> dict[str, object]:
    _require_design(DIT_FILE)
    _require_design(VAE_FILE)
    return audit.audit_t2v(DIT_FILE, VAE_FILE, TOY_MODEL_DIR / TOY_FILES["t5"], seeds=2)


@pytest.mark.parametrize("target", _params(audit.VAE_TARGETS, OPEN_VAE_TARGETS))
def test_shipped_vae_keeps_shapes_and_flat_backgrounds(vae_figures: dict[str, object], target: str) -> None:
    assert audit.check_targets(vae_figures, {target: audit.VAE_TARGETS[target]}) == [], vae_figures


@pytest.mark.slow
@pytest.mark.parametrize("target", _params(audit.T2V_TARGETS, OPEN_T2V_TARGETS))
def test_shipped_t2v_draws_shapes_keeps_still_objects_still_and_moves_smoothly(t2v_figures: dict[str, object],
                                                                              target: str) -> None:
    assert audit.check_targets(t2v_figures, {target: audit.T2V_TARGETS[target]}) == [], t2v_figures


def test_open_targets_are_targets() -> None:
    assert OPEN_VAE_TARGETS <= set(audit.VAE_TARGETS) and OPEN_T2V_TARGETS <= set(audit.T2V_TARGETS)


def test_design_stamp_round_trip_keeps_tensors_and_metadata(tmp_path: Path) -> None:
    path = save_safetensors({"w": torch.arange(6.0).view(2, 3)}, tmp_path / "f.safetensors", {"other": "x"})
    assert audit.design_version(path) == 1  # unstamped files predate the design
    audit.stamp_design(path)
    assert audit.design_version(path) == audit.DESIGN_VERSION
    assert read_metadata(path)["other"] == "x"
    assert torch.equal(load_state_dict(path)["w"], torch.arange(6.0).view(2, 3))
    save_safetensors({"w": torch.zeros(1)}, path, {audit.DESIGN_METADATA_KEY: "two"})
    with pytest.raises(ValueError, match="wantuner_toy_design is 'two'"):
        audit.design_version(path)


def test_recipe_vae_stage_trains_with_the_design_losses_and_stamps_the_file(tmp_path: Path, monkeypatch) -> None:
    from training.toy import recipe

    calls = []

    def fake_run(args, log):  # stands in for the vae_train subprocess: records its arguments, writes its outputs
        calls.append([str(a) for a in args])
        out = Path(args[args.index("--out") + 1])
        save_safetensors({"w": torch.zeros(1)}, out, {"other": "kept"})
        Path(args[args.index("--report") + 1]).write_text('{"psnr": 1.0}')

    monkeypatch.setattr(recipe, "run", fake_run)
    cfg = recipe.RecipeConfig(vae_edge_weight=2.0, vae_l1_weight=1.0, vae_shape_weight=0.1, vae_init="haar",
                              vae_fan_in_lr=64, vae_detail_gain=3.0, vae_image_first=300, vae_image_fraction=0.3,
                              vae_frame_wise=True, vae_polish_steps=40, vae_polish_lr=1e-4,
                              vae_polish_background_l1=0.5)
    rec = recipe.Recipe(cfg, tmp_path / "out", tmp_path / "work")
    (tmp_path / "out").mkdir()
    rec.stage_vae()
    args = calls[0]
    assert args[args.index("--edge_weight") + 1] == "2.0" and args[args.index("--l1_weight") + 1] == "1.0"
    assert args[args.index("--shape_weight") + 1] == "0.1"
    assert args[args.index("--init") + 1] == "haar" and args[args.index("--fan_in_lr") + 1] == "64"
    assert args[args.index("--detail_gain") + 1] == "3.0" and args[args.index("--image_first") + 1] == "300"
    assert args[args.index("--image_fraction") + 1] == "0.3" and "--frame_wise" in args
    assert args[args.index("--polish_steps") + 1] == "40" and args[args.index("--polish_lr") + 1] == "0.0001"
    assert args[args.index("--polish_background_l1") + 1] == "0.5"
    assert recipe.build_parser().parse_args(["--out", "x"]).vae_frame_wise is True
    assert recipe.build_parser().parse_args(["--out", "x", "--no-vae_frame_wise"]).vae_frame_wise is False
    with pytest.raises(ValueError, match="image_first must be in"):
        recipe.RecipeConfig(vae_steps=100, vae_image_first=300)
    with pytest.raises(ValueError, match="polish_steps must be >= 0"):
        recipe.RecipeConfig(vae_polish_steps=-1)
    for path in (rec.path("vae"), tmp_path / "work" / "vae" / TOY_FILES["vae"]):
        assert audit.design_version(path) == audit.DESIGN_VERSION and read_metadata(path)["other"] == "kept"


def test_recipe_dit_stage_stamps_the_t2v_dit(tmp_path: Path, monkeypatch) -> None:
    from training.toy import recipe

    def fake_run(args, log):  # stands in for the trainer: writes the trained file where the recipe expects it
        folder, name = Path(args[args.index("--output_dir") + 1]), args[args.index("--output_name") + 1]
        save_safetensors({"w": torch.ones(2)}, folder / f"{name}.safetensors", {"other": "kept"})

    monkeypatch.setattr(recipe, "run", fake_run)
    rec = recipe.Recipe(recipe.RecipeConfig(), tmp_path / "out", tmp_path / "work")
    (tmp_path / "out").mkdir()
    rec.stage_dit()
    assert audit.design_version(rec.path("dit")) == audit.DESIGN_VERSION
    assert torch.equal(load_state_dict(rec.path("dit"))["w"], torch.ones(2))
