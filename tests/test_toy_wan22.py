"""The toy Wan2.2 T2V-A14B expert pair (training/toy/wan22.py) on tiny random files and a tiny budget: the boundary
from the T2V DiT's sampling defaults, both expert files with their metadata and each trained only on its side of
the boundary, the evaluation of the single DiT / the pair / the swapped pair; and the generate CLI's toy-pair and
metadata defaults for --task t2v-A14B (temporary files, never the shipped toy folder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.model_set import write_model_set
from training.__main__ import main as training_main
from training.toy import audit, wan22
from training.toy.evaluate import Sampling, write_sampling
from wan_core.loading import model_set
from wan_core.loading.checkpoint import read_metadata
from wan_core.loading.model_set import SAMPLING_METADATA_KEY, TOY_EXPERT_FILES, sampling_defaults
from wan_core.models.dit import WanModel, load_dit
from wan_core.sampling.experts import ExpertSwitch
from wan_core.sampling.solvers import get_schedule
from wan_core.toy.world import HELDOUT, Combo, write_dataset

TOY_SAMPLING = Sampling(steps=12, guidance=3.0, shift=3.0)  # the shipped T2V DiT's stored defaults


@pytest.mark.parametrize(("steps", "shift", "share"), [(12, 3.0, 0.5), (12, 3.0, 0.65), (20, 5.0, 0.5), (3, 1.0, 0.5),
                                                       (40, 12.0, 0.65)])
def test_toy_boundary_gives_the_high_noise_expert_its_share_of_the_steps(steps, shift, share) -> None:
    boundary = wan22.toy_boundary(steps, shift, "unipc", share)
    timesteps = get_schedule("unipc", steps, shift).timesteps.tolist()
    high = [t for t in timesteps if t >= boundary * 1000]
    assert len(high) == min(max(round(share * steps), 1), steps - 1)
    assert timesteps[: len(high)] == high  # the first steps, then the low-noise expert to the end


def test_toy_boundary_rejects_what_it_cannot_split() -> None:
    with pytest.raises(ValueError, match="at least 2 sampling steps to split, got 1"):
        wan22.toy_boundary(1, 3.0, "unipc", 0.5)
    with pytest.raises(ValueError, match=r"high_share must be in \(0, 1\), got 1.0"):
        wan22.toy_boundary(12, 3.0, "unipc", 1.0)


# ----------------------------------------------------------------------------------------------------------------
# The build on a tiny budget
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random T2V DiT (with the toy's stored sampling defaults), VAE and umT5, and a cached 3-clip dataset."""
    folder = tmp_path_factory.mktemp("wan22_toy")
    paths = write_model_set(folder / "models")
    write_sampling(paths["dit_t2v"], TOY_SAMPLING)
    combos = [Combo("red", "square", "right"), Combo("blue", "circle", "still"), Combo("green", "triangle", "up")]
    write_dataset(folder / "data", combos, 1, seed=5, batch_size=1)
    toml = folder / "data" / "dataset.toml"
    assert training_main(["cache-latents", "--dataset_config", str(toml), "--vae", str(paths["vae"]), "--vae_dtype",
                          "float32", "--device", "cpu"]) == 0
    assert training_main(["cache-text", "--dataset_config", str(toml), "--t5", str(paths["t5"]), "--device",
                          "cpu"]) == 0
    return paths | {"dataset": toml, "root": folder}


def _in_process(args, log) -> None:
    """The stage's `python -m training ...` commands run in this process (no interpreter start per command)."""
    argv = [str(a) for a in args]
    assert argv[:2] == ["-m", "training"]
    if training_main(argv[2:]) != 0:
        raise RuntimeError(f"{argv} failed")


def _record_training_timesteps(monkeypatch: pytest.MonkeyPatch) -> list[list[float]]:
    """The timesteps of every training forward, one list per `training train` run."""
    runs: list[list[float]] = []
    forward = WanModel.forward

    def spy(self, x, t, *args, **kwargs):
        if torch.is_grad_enabled():
            runs[-1].extend(float(v) for v in torch.as_tensor(t).flatten())
        return forward(self, x, t, *args, **kwargs)

    def run(args, log) -> None:
        runs.append([])
        _in_process(args, log)

    monkeypatch.setattr(WanModel, "forward", spy)
    monkeypatch.setattr(wan22, "run", run)
    monkeypatch.setattr(wan22, "run_all", lambda jobs: [run(args, log) for args, log in jobs])  # one after another
    return runs


def test_stage_writes_both_experts_trained_on_their_sides_of_the_boundary(tiny, tmp_path, monkeypatch) -> None:
    seen = _record_training_timesteps(monkeypatch)
    cfg = wan22.Wan22Config(steps=6, evaluate=False)
    report = wan22.build_wan22(tmp_path / "out", tmp_path / "work", tiny["dit_t2v"], tiny["vae"], tiny["t5"],
                               tiny["dataset"], cfg)
    boundary = wan22.toy_boundary(12, 3.0, "unipc", 0.5)
    assert 0.7 < boundary < 0.85  # 6 of the 12 toy steps at shift 3 above it (Wan2.2's 0.875 would give 4)
    edge = round(boundary * 1000)
    assert report["figures"]["ranges"] == {"high": [edge, 1000], "low": [0, edge]}
    assert report["figures"]["high_noise_steps"] == "6 of 12"
    high, low = (tmp_path / "out" / name for name in TOY_EXPERT_FILES["t2v-A14B"])
    base = sampling_defaults(tiny["dit_t2v"])
    for path, (lo, hi), timesteps in ((high, (edge, 1000), seen[0]), (low, (0, edge), seen[1])):
        meta = read_metadata(path)
        assert json.loads(meta[SAMPLING_METADATA_KEY]) == base | {"task": "t2v-A14B", "timestep_boundary": boundary,
                                                                  "guidance_scale_high_noise": 3.0}
        assert meta["modelspec.timestep_range"] == f"{lo},{hi}" and meta["wantuner_task"] == "t2v-A14B"
        assert meta["ss_steps"] == "6"
        assert len(timesteps) == 6 and all(lo <= t <= hi for t in timesteps), timesteps
        sd = load_dit(path).state_dict()
        assert {v.dtype for v in sd.values()} == {torch.float16}
        start = load_dit(tiny["dit_t2v"], dtype=torch.float16).state_dict()
        assert sd.keys() == start.keys() and any(not torch.equal(sd[k], start[k]) for k in sd)  # trained
    assert not torch.equal(load_dit(high).blocks[0].ffn[0].weight, load_dit(low).blocks[0].ffn[0].weight)


@pytest.mark.parametrize("parallel", [True, False])
def test_experts_train_at_once_with_their_own_logs_or_one_after_another(tiny, tmp_path, monkeypatch,
                                                                        parallel: bool) -> None:
    calls = []
    monkeypatch.setattr(wan22, "run", lambda args, log: calls.append(("run", [str(a) for a in args], log)))
    monkeypatch.setattr(wan22, "run_all", lambda jobs: calls.append(("run_all", [[str(a) for a in args]
                                                                                  for args, _ in jobs],
                                                                                 [log for _, log in jobs])))
    monkeypatch.setattr(wan22.Wan22Build, "keep", lambda self, expert: None)
    monkeypatch.setattr(wan22.Wan22Build, "save", lambda self: None)
    build = wan22.Wan22Build(wan22.Wan22Config(steps=3, parallel=parallel), tmp_path / "out", tmp_path / "work",
                             tiny["dit_t2v"], tiny["vae"], tiny["t5"], tiny["dataset"])
    init = tmp_path / "init.safetensors"
    if parallel:
        build.train_both(init, 0.778)
        ((kind, args, logs),) = calls
        assert kind == "run_all" and logs == [tmp_path / "work" / f"train_{e}.log" for e in wan22.EXPERTS]
    else:
        for expert in wan22.EXPERTS:
            build.stage_train(expert, init, 0.778)
        assert [c[0] for c in calls] == ["run", "run"] and {c[2] for c in calls} == {build.log}
        args = [c[1] for c in calls]
    ranges = [(a[a.index("--min_timestep") + 1], a[a.index("--max_timestep") + 1]) for a in args]
    assert ranges == [("778", "1000"), ("0", "778")]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("high_share", 0.0, r"high_share must be in \(0, 1\), got 0.0"), ("steps", 0, "steps must be >= 1, got 0"),
    ("audit_seeds", 0, "audit_seeds must be >= 1, got 0"), ("lr", 0.0, "lr must be > 0, got 0.0")])
def test_config_refuses_bad_values(field, value, message) -> None:
    with pytest.raises(ValueError, match=message):
        wan22.Wan22Config(**{field: value})


def test_stage_refuses_a_t2v_dit_without_sampling_defaults(tiny, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(wan22, "run", lambda *a: pytest.fail("trained before checking the T2V file"))
    with pytest.raises(ValueError, match="has no wantuner_sampling infer_steps, flow_shift, guidance_scale"):
        wan22.build_wan22(tmp_path, tmp_path, tiny["dit_fc"], tiny["vae"], tiny["t5"], tiny["dataset"])


def test_evaluation_samples_the_single_dit_the_pair_and_the_swapped_pair(tiny, tmp_path, monkeypatch) -> None:
    """Setups differ only in which weights run which steps: with the experts equal to the single DiT (same
    guidance on both sides) all three give the same figures; the pair calls the high-noise expert on the steps
    above the boundary."""
    small = sampling_defaults(tiny["dit_t2v"]) | {"infer_steps": 2, "video_size": [32, 32], "video_length": 5}
    sampling = wan22.expert_sampling(small, 0.9, 3.0)  # 2 steps at shift 3: t = 999 (high noise), 750 (low)
    t2v = wan22.write_expert_init(tiny["dit_t2v"], tmp_path / "t2v.safetensors", small)
    pair = [wan22.write_expert_init(tiny["dit_t2v"], tmp_path / f"{e}.safetensors", sampling) for e in ("h", "l")]
    jobs = audit.audit_jobs(1)  # a few combinations, held-out ones included, keep the test short
    monkeypatch.setattr(audit, "audit_jobs", lambda seeds: (jobs[0][:: 6], jobs[1][:: 6]))
    assert any(c in HELDOUT for c in jobs[0][:: 6])
    cfg = wan22.Wan22Config(eval_heldout_seeds=1, eval_train_count=0, audit_seeds=1)
    figures = wan22.evaluate_setups(t2v, pair[0], pair[1], tiny["vae"], tiny["t5"], cfg)
    assert set(figures) == set(wan22.SETUPS)
    for setup in ("pair", "swapped"):
        for judge in ("score", "audit"):
            drop = {"seconds"}
            got, want = ({k: v for k, v in figures[n][judge].items() if k not in drop} for n in (setup, "single"))
            assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True), (setup, judge)  # NaN too
    samples = 12 + len(jobs[0][:: 6])  # scorer pairs + audit clips, 2 steps x (prompt, negative) each
    assert figures["pair"]["expert_calls"] == figures["swapped"]["expert_calls"] == {"high": 2 * samples,
                                                                                     "low": 2 * samples}
    assert "expert_calls" not in figures["single"]
    assert wan22.claims(figures) == {"pair_at_least_single_score": True, "pair_at_least_single_audit": True,
                                     "swap_hurts_score": False, "swap_hurts_audit": False,
                                     "swap_hurts_noise": False, "swap_hurts_shape": False}
    assert wan22.cleaner_share(figures, "pair", "swapped") == 0.0  # equal noise is not cleaner
    rows = wan22.readme_rows(figures)
    assert len(rows) == 5 and rows[2].startswith("| single | ")


def test_denoising_errors_split_the_schedule_at_the_boundary_and_tell_experts_apart(tiny) -> None:
    """Each model's fixed-noise velocity error over the schedule's timesteps on each side of the boundary: equal
    weights give equal errors (not specialised); an expert whose weights are perturbed is worse on both sides."""
    sampling = wan22.expert_sampling(sampling_defaults(tiny["dit_t2v"]), wan22.toy_boundary(12, 3.0, "unipc", 0.5),
                                     3.0)
    single = load_dit(tiny["dit_t2v"], dtype=torch.float32)
    same = wan22.denoising_errors({"single": single, "high": single, "low": single}, tiny["dataset"], sampling, 1, 0)
    timesteps = [round(float(t)) for t in get_schedule("unipc", 12, 3.0).timesteps]
    assert same["timesteps"] == {"high": timesteps[:6], "low": timesteps[6:]} and same["clips"] == 3
    assert same["errors"]["single"] == same["errors"]["high"] == same["errors"]["low"]
    assert all(v > 0 for v in same["errors"]["single"].values())
    assert not wan22.specialised(same)
    worse = load_dit(tiny["dit_t2v"], dtype=torch.float32)
    with torch.no_grad():
        worse.head.head.weight.add_(torch.randn_like(worse.head.head.weight))
    mixed = wan22.denoising_errors({"single": single, "high": single, "low": worse}, tiny["dataset"], sampling, 1, 0)
    assert mixed["errors"]["high"] == same["errors"]["single"]  # same noise, same clips: the same numbers
    assert all(mixed["errors"]["low"][side] > mixed["errors"]["high"][side] for side in wan22.EXPERTS)
    assert not wan22.specialised(mixed)  # the low-noise expert is not better on its own side
    assert wan22.specialised({"errors": {"high": {"high": 1.0, "low": 2.0}, "low": {"high": 1.5, "low": 0.5}}})


def test_build_with_evaluation_reports_setups_and_denoising_errors(tiny, tmp_path, monkeypatch) -> None:
    _record_training_timesteps(monkeypatch)
    small = sampling_defaults(tiny["dit_t2v"]) | {"infer_steps": 2, "video_size": [32, 32], "video_length": 5}
    t2v = wan22.write_expert_init(tiny["dit_t2v"], tmp_path / "t2v.safetensors", small)
    jobs = audit.audit_jobs(1)
    monkeypatch.setattr(audit, "audit_jobs", lambda seeds: (jobs[0][:: 12], jobs[1][:: 12]))
    cfg = wan22.Wan22Config(steps=2, eval_heldout_seeds=1, eval_train_count=0, error_every=1)
    report = wan22.build_wan22(tmp_path / "out", tmp_path / "work", t2v, tiny["vae"], tiny["t5"], tiny["dataset"],
                               cfg)
    figures = report["figures"]
    assert set(figures["setups"]) == set(wan22.SETUPS) and "errors" in report["stages"]
    assert set(figures["denoising"]["errors"]) == {"single", "high", "low"}
    assert figures["denoising"]["clips"] == 3 and len(figures["denoising"]["timesteps"]["high"]) == 1
    assert isinstance(figures["claims"]["experts_specialised"], bool)
    saved = json.loads((tmp_path / "work" / wan22.Wan22Build.REPORT_NAME).read_text())
    assert saved["figures"]["denoising"] == figures["denoising"]


def test_swapped_setup_runs_the_low_noise_expert_above_the_boundary() -> None:
    from tests.tiny import TINY_DIT

    high, low, single = WanModel(TINY_DIT), WanModel(TINY_DIT), WanModel(TINY_DIT)
    sampling = {"timestep_boundary": 0.5, "guidance_scale_high_noise": 4.0, "guidance_scale": 3.0}
    pair = wan22.setup_model("pair", single, high, low, sampling)
    swapped = wan22.setup_model("swapped", single, high, low, sampling)
    assert wan22.setup_model("single", single, high, low, sampling) is single
    assert isinstance(pair, ExpertSwitch) and isinstance(swapped, ExpertSwitch)
    assert pair.sources == {"high": high, "low": low} and swapped.sources == {"high": low, "low": high}
    assert pair.step_guidance([900.0, 100.0]) == swapped.step_guidance([900.0, 100.0]) == [4.0, 3.0]
    with pytest.raises(ValueError, match="unknown setup 'both'"):
        wan22.setup_model("both", single, high, low, sampling)


# ----------------------------------------------------------------------------------------------------------------
# The generate CLI: --task t2v-A14B with no model paths, and the boundary default from the DiT's metadata
# ----------------------------------------------------------------------------------------------------------------


def _toy_folder(tmp_path: Path, tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A toy folder (patched in as TOY_MODEL_DIR) holding the tiny VAE / umT5 under the toy names and an expert pair
    under the toy pair's names (the T2V DiT's weights, boundary 0.6, high-noise guidance 4.5); returns (high, low)."""
    folder = tmp_path / "toy"
    folder.mkdir()
    for kind in ("vae", "t5"):
        (folder / model_set.TOY_FILES[kind]).write_bytes(tiny[kind].read_bytes())
    sampling = wan22.expert_sampling(sampling_defaults(tiny["dit_t2v"]) | {"infer_steps": 4, "video_size": [32, 32],
                                                                            "video_length": 5}, 0.6, 4.5)
    high, low = (folder / name for name in TOY_EXPERT_FILES["t2v-A14B"])
    wan22.write_expert_init(tiny["dit_t2v"], high, sampling)
    wan22.write_expert_init(tiny["dit_t2v"], low, sampling)
    monkeypatch.setattr(model_set, "TOY_MODEL_DIR", folder)
    return high, low


def _switches(monkeypatch: pytest.MonkeyPatch) -> list[ExpertSwitch]:
    made: list[ExpertSwitch] = []
    init = ExpertSwitch.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(ExpertSwitch, "__init__", spy)
    return made


def test_t2v_a14b_without_model_paths_uses_the_toy_pair_and_its_stored_boundary(tiny, tmp_path, monkeypatch):
    from wan_core.generate.cli import main

    high, low = _toy_folder(tmp_path, tiny, monkeypatch)
    made = _switches(monkeypatch)
    argv = ["--task", "t2v-A14B", "--prompt", "a red square moving right", "--save_path", str(tmp_path / "out"),
            "--output_type", "latent", "--seed", "1", "--quiet", "--device", "cpu"]
    assert main(argv) == 0
    (switch,) = made
    assert switch.boundary == 0.6 and switch.guidance == {"high": 4.5, "low": 3.0}
    timesteps = get_schedule("unipc", 4, 3.0).timesteps.tolist()
    assert switch.used == ["high" if t >= 600 else "low" for t in timesteps for _ in range(2)]
    assert len(list((tmp_path / "out").glob("*_latent.safetensors"))) == 1
    # the command line still wins over the file's defaults
    assert main([*argv, "--timestep_boundary", "0.95", "--guidance_scale_high_noise", "2.0"]) == 0
    assert made[1].boundary == 0.95 and made[1].guidance["high"] == 2.0


def test_t2v_a14b_without_model_paths_and_no_toy_pair_is_one_clear_error(tiny, tmp_path, monkeypatch, capsys):
    from wan_core.generate.cli import main

    high, low = _toy_folder(tmp_path, tiny, monkeypatch)
    low.unlink()  # one expert of the pair is not enough
    assert main(["--task", "t2v-A14B", "--prompt", "a red square", "--save_path", str(tmp_path / "out"),
                 "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "there is no embedded toy model for the Wan2.2 task t2v-A14B: give its DiT with --dit" in err
    assert f"{high.name} and {low.name} are not in {high.parent}" in err and "--stages wan22" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_given_dit_is_not_replaced_by_the_toy_pair(tiny, tmp_path, monkeypatch) -> None:
    _toy_folder(tmp_path, tiny, monkeypatch)
    assert model_set.with_toy_experts("t2v-A14B", str(tiny["dit_t2v"]), None) == (str(tiny["dit_t2v"]), None)
    assert model_set.with_toy_experts("t2v-A14B", None, "h.safetensors") == (None, "h.safetensors")
    assert model_set.with_toy_experts("i2v-A14B", None, None) == (None, None)
    assert model_set.with_toy_experts("t2v-14B", None, None) == (None, None)
    high, low = (str(model_set.TOY_MODEL_DIR / n) for n in TOY_EXPERT_FILES["t2v-A14B"])
    assert model_set.with_toy_experts("t2v-A14B", None, None) == (low, high)


def test_recipe_runs_wan22_after_variants_with_its_config_and_the_t2v_dataset(tmp_path, monkeypatch) -> None:
    from training.toy import recipe

    assert recipe.STAGES[-2:] == ("variants", "wan22")
    calls = []
    monkeypatch.setattr(recipe, "build_wan22", lambda *args: calls.append(args) or {"stages": {}, "figures": {}})
    (tmp_path / "work" / "data_base").mkdir(parents=True)
    (tmp_path / "work" / "data_base" / "dataset.toml").write_text("")
    cfg = recipe.RecipeConfig(seed=3, wan22_steps=7, wan22_high_share=0.6, wan22_lr=1e-4, wan22_audit_seeds=2)
    recipe.Recipe(cfg, tmp_path / "out", tmp_path / "work").run(["wan22"])
    ((out, work, t2v, vae, t5, toml, config),) = calls
    assert (out, work, toml) == (tmp_path / "out", tmp_path / "work" / "wan22",
                                 tmp_path / "work" / "data_base" / "dataset.toml")
    assert (t2v.name, vae.name, t5.name) == (model_set.TOY_FILES["dit"], model_set.TOY_FILES["vae"],
                                             model_set.TOY_FILES["t5"])
    assert config == wan22.Wan22Config(seed=3, high_share=0.6, steps=7, lr=1e-4, audit_seeds=2)
