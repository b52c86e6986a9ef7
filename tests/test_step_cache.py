"""Step caching (wan_core.runtime.step_cache): exactness at threshold 0, skipped forwards at a positive threshold,
per-branch caches, first/last steps computed, calibration fit and JSON round trip, the CLIs' flags."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from wan_core import calibrate_cache
from wan_core.generate import cli
from wan_core.loading.model_set import TOY_FILES, TOY_MODEL_DIR
from wan_core.models.config import TASKS
from wan_core.models.dit import WanModel, load_dit
from wan_core.models.t5 import load_t5
from wan_core.runtime import step_cache
from wan_core.runtime.step_cache import (
    DEFAULT_THRESHOLDS,
    PUBLISHED_TEACACHE,
    UNCALIBRATED,
    CacheCalibration,
    CalibrationRecorder,
    StepCache,
    StepCacheSettings,
    calibration_path,
    find_calibration,
)
from wan_core.sampling.conditioning import text_to_video
from wan_core.sampling.pipeline import SamplerSettings, denoise, encode_prompts

STEPS = 12
PROMPT = "a red square moving right"


@pytest.fixture(scope="module")
def toy() -> dict:
    dit = load_dit(TOY_MODEL_DIR / TOY_FILES["dit"], dtype=torch.float32)
    embeds = encode_prompts(load_t5(TOY_MODEL_DIR / TOY_FILES["t5"]), [PROMPT, ""])
    return {"dit": dit, "context": [embeds[0]], "negative": [embeds[1]], "cond": text_to_video(64, 64, 9),
            "calibration": find_calibration(TOY_MODEL_DIR / TOY_FILES["dit"])}


def sample(toy: dict, step_cache=None, steps: int = STEPS, seed: int = 3) -> torch.Tensor:
    settings = SamplerSettings(steps=steps, guidance_scale=3.0, flow_shift=3.0, seed=seed)
    return denoise(toy["dit"], toy["cond"], toy["context"], toy["negative"], settings, step_cache=step_cache)


class ForwardCounter:
    """Counts DiT forwards and the step of each (steps told by the sampler's callback order)."""

    def __init__(self, dit: torch.nn.Module) -> None:
        self.count = 0
        self.handle = dit.register_forward_hook(self._hook)

    def _hook(self, *_args) -> None:
        self.count += 1


def test_toy_calibration_is_stored_beside_the_toy_dit(toy):
    assert toy["calibration"] is not None
    assert set(toy["calibration"].magcache_ratios) == {"cond", "uncond"}


@pytest.mark.parametrize("mode", ["teacache", "magcache"])
def test_threshold_zero_is_bit_identical_to_uncached(toy, mode):
    reference = sample(toy)
    cache = StepCache(StepCacheSettings(mode, 0.0, toy["calibration"]))
    counter = ForwardCounter(toy["dit"])
    try:
        out = sample(toy, cache)
    finally:
        counter.handle.remove()
    assert torch.equal(out, reference)
    assert counter.count == 2 * STEPS and cache.skipped == 0


@pytest.mark.parametrize(("mode", "threshold"), [("teacache", 0.1), ("magcache", 0.01)])
def test_positive_threshold_skips_forwards_and_keeps_the_video(toy, mode, threshold):
    reference = sample(toy)
    cache = StepCache(StepCacheSettings(mode, threshold, toy["calibration"]))
    counter = ForwardCounter(toy["dit"])
    try:
        out = sample(toy, cache)
    finally:
        counter.handle.remove()
    assert cache.skipped > 0
    assert counter.count == cache.computed == 2 * STEPS - cache.skipped
    # still the same video: nearer the uncached run of its seed than the uncached runs of other seeds
    others = [sample(toy, seed=seed) for seed in (4, 5)]
    assert all((out - reference).norm() < (out - other).norm() for other in others)


def test_each_branch_reuses_its_own_output_and_first_and_last_steps_are_computed(toy):
    calls: list[tuple[str, int]] = []
    cache = StepCache(StepCacheSettings("teacache", 1e9, toy["calibration"]))
    cache.start(toy["dit"], 4)

    def predict(x, t, branch, skip):
        calls.append((branch, step))
        return torch.full_like(x, float(len(calls)))

    velocity = cache.wrap_velocity(lambda x, t, i: torch.stack([wrapped(x, t, "cond", ()),
                                                                 wrapped(x, t, "uncond", ())]))
    wrapped = cache.wrap_predict(predict)
    x = torch.zeros(1, 16, 1, 2, 2)
    outs = []
    for step in range(4):
        outs.append(velocity(x, torch.tensor([1000.0 - 250 * step]), step))
    assert calls == [("cond", 0), ("uncond", 0), ("cond", 3), ("uncond", 3)]
    assert [float(o[0].max()) for o in outs] == [1.0, 1.0, 1.0, 3.0]
    assert [float(o[1].max()) for o in outs] == [2.0, 2.0, 2.0, 4.0]
    assert (cache.computed, cache.skipped) == (4, 4)


def test_magcache_skips_at_most_max_skips_in_a_row(toy):
    steps = 8
    calibration = CacheCalibration(steps, (0.0,), {"cond": (1.0,) * steps})
    cache = StepCache(StepCacheSettings("magcache", 1.0, calibration, max_skips=2))
    cache.start(toy["dit"], steps)
    computed: list[int] = []
    wrapped = cache.wrap_predict(lambda x, t, branch, skip: computed.append(step) or x)
    velocity = cache.wrap_velocity(lambda x, t, i: wrapped(x, t, "cond", ()))
    for step in range(steps):
        velocity(torch.zeros(1, 16, 1, 2, 2), torch.tensor([1000.0 - 100 * step]), step)
    assert computed == [0, 3, 6, 7]


def test_recorder_fit_recovers_a_known_polynomial_and_ratios():
    coefficients = (3.0, -2.0, 0.5, 0.25, 0.01)
    recorder = CalibrationRecorder()
    xs = np.linspace(0.01, 0.2, 40)
    recorder.points = [(float(x), float(np.polyval(coefficients, x))) for x in xs]
    recorder.ratios = {"cond": [[1.0, 0.9, 1.1], [1.0, 0.7, 1.3]]}
    calibration = recorder.fit(3)
    # float64 least squares on exact data: error of the order of the Vandermonde conditioning times eps
    np.testing.assert_allclose(calibration.teacache_coefficients, coefficients, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(calibration.magcache_ratios["cond"], (1.0, 0.8, 1.2))


def test_calibration_round_trips_through_json(tmp_path, toy):
    path = toy["calibration"].save(tmp_path / "c.json")
    assert CacheCalibration.load(path) == toy["calibration"]
    recorder = CalibrationRecorder()
    sample(toy, recorder)
    fitted = recorder.fit(STEPS, source="toy")
    assert CacheCalibration.from_json(fitted.to_json()) == fitted


@pytest.mark.parametrize(("text", "message"), [
    ('{"format": "other"}', "is not a step-cache calibration"),
    ('{"format": "wantuner-step-cache", "version": 1, "steps": 3}', "lacks or misshapes"),
    ('{"format": "wantuner-step-cache", "version": 1, "steps": 2, "teacache": {"coefficients": [1]}, '
     '"magcache": {"ratios": {"cond": [1.0]}}}', "must be 2 positive numbers"),
])
def test_bad_calibration_json_is_refused(text, message):
    with pytest.raises(ValueError, match=message):
        CacheCalibration.from_json(text)


def test_bad_cache_settings_are_refused():
    with pytest.raises(ValueError, match="unknown cache_mode 'fast'"):
        StepCacheSettings("fast", 0.1)
    with pytest.raises(ValueError, match="cache_threshold must be a finite number >= 0, got -1"):
        StepCacheSettings("teacache", -1)


def test_generate_cli_refuses_a_negative_threshold_before_loading(tmp_path, capsys):
    code = cli.main(["--prompt", PROMPT, "--save_path", str(tmp_path), "--cache_mode", "teacache",
                     "--cache_threshold", "-0.5", "--quiet"])
    assert code == 2
    assert "cache_threshold must be a finite number >= 0, got -0.5" in capsys.readouterr().err


def test_generate_cli_finds_the_calibration_beside_the_dit_or_warns(toy, tmp_path, caplog):
    dit = tmp_path / "model.safetensors"
    shutil.copy(TOY_MODEL_DIR / TOY_FILES["dit"], dit)
    args = cli.build_parser().parse_args(["--dit", str(dit), "--cache_mode", "magcache"])
    spec = cli.spec_from_args(args)
    settings = cli.cache_settings(args, spec)
    assert settings.calibration is None and not settings.active
    assert cli.job_step_cache(settings, toy["dit"], SimpleNamespace(task="t2v-14B", height=64, width=64), spec) is None
    assert "model.safetensors (no model.stepcache.json): " + UNCALIBRATED in caplog.text
    shutil.copy(calibration_path(TOY_MODEL_DIR / TOY_FILES["dit"]), calibration_path(dit))
    settings = cli.cache_settings(args, spec)
    assert settings.active and settings.calibration == find_calibration(TOY_MODEL_DIR / TOY_FILES["dit"])


def _official(task: str) -> WanModel:
    """A DiT of an official architecture on the meta device (no weights)."""
    with torch.device("meta"):
        return WanModel(TASKS[task].dit)


@pytest.mark.parametrize(("task", "model_task", "size", "key"), [
    ("t2v-14B", "t2v-14B", (720, 1280), ("t2v-14B", "")),
    ("t2v-1.3B", "t2v-1.3B", (480, 832), ("t2v-1.3B", "")),
    ("i2v-14B", "i2v-14B", (480, 832), ("i2v-14B", "480p")),
    ("i2v-14B", "i2v-14B", (720, 1280), ("i2v-14B", "720p")),
    ("t2v-A14B", "t2v-14B", (720, 1280), None),  # a Wan2.2 expert: the T2V-14B shapes, other weights
    ("ti2v-5B", "ti2v-5B", (704, 1280), None),
])
def test_generate_cli_uses_the_published_coefficients_for_official_shapes(task, model_task, size, key, tmp_path,
                                                                          caplog):
    """Without a calibration file the CLI picks the published TeaCache polynomial of an official Wan2.1 DiT (as the
    sampler node does), by the DiT's architecture, the task and the video size, and logs where it came from."""
    args = cli.build_parser().parse_args(["--dit", str(tmp_path / "official.safetensors"), "--cache_mode",
                                          "teacache"])
    spec = cli.spec_from_args(args)
    settings = cli.cache_settings(args, spec)
    assert settings.calibration is None
    job = SimpleNamespace(task=task, height=size[0], width=size[1])
    with caplog.at_level(logging.INFO, logger="wan_core.runtime.step_cache"):
        cache = cli.job_step_cache(settings, _official(model_task), job, spec)
    if key is None:
        assert cache is None and UNCALIBRATED in caplog.text
        return
    assert cache is not None and cache.settings.calibration.teacache_coefficients == PUBLISHED_TEACACHE[key]
    assert cache.settings.threshold == DEFAULT_THRESHOLDS["teacache"]
    source = f"published TeaCache coefficients of Wan2.1 {key[0]}" + (f" {key[1]}" if key[1] else "")
    assert f"step cache teacache, threshold 0.15, calibration: {source}" in caplog.text


def test_generate_cli_run_without_calibration_caches_with_the_published_coefficients(tmp_path, caplog,
                                                                                       monkeypatch):
    """End to end: a toy DiT taken for the official T2V-1.3B architecture (the shape check patched) and no
    calibration file beside it samples with the published polynomial, skipping model calls; the real toy shape
    gets none."""
    dit = tmp_path / "toy.safetensors"
    shutil.copy(TOY_MODEL_DIR / TOY_FILES["dit"], dit)
    argv = ["--dit", str(dit), "--prompt", PROMPT, "--save_path", str(tmp_path), "--output_type", "latent",
            "--infer_steps", "8", "--cache_mode", "teacache", "--quiet"]
    with caplog.at_level(logging.INFO):
        assert cli.main(argv) == 0
    assert "toy.safetensors (no toy.stepcache.json): " + UNCALIBRATED in caplog.text
    assert "step cache off" in caplog.text
    caplog.clear()
    monkeypatch.setattr(step_cache, "_official_task", lambda config: "t2v-1.3B")
    with caplog.at_level(logging.INFO):
        assert cli.main(argv) == 0
    assert "calibration: published TeaCache coefficients of Wan2.1 t2v-1.3B" in caplog.text
    skipped = re.search(r"step cache teacache: skipped (\d+) of (\d+) model calls", caplog.text)
    assert skipped is not None and 0 < int(skipped[1]) < int(skipped[2])


def test_calibrate_cache_cli_writes_a_loadable_calibration(tmp_path):
    out = tmp_path / "toy.json"
    code = calibrate_cache.main(["--prompts", PROMPT, "a blue circle moving up", "--out", str(out), "--quiet"])
    assert code == 0
    calibration = CacheCalibration.load(out)
    assert calibration.steps == STEPS and set(calibration.magcache_ratios) == {"cond", "uncond"}
    assert json.loads(out.read_text())["source"] == Path(TOY_FILES["dit"]).name


def test_official_wan21_configs_get_the_published_teacache_coefficients(tmp_path):
    """Without a calibration file an official-shaped Wan2.1 DiT falls back to the published TeaCache polynomial (I2V
    by resolution); other models (toy, Wan2.2 experts with the T2V-14B shapes) stay uncalibrated."""
    from wan_core.models.config import TASKS
    from wan_core.runtime.step_cache import PUBLISHED_TEACACHE, published_calibration, resolve_calibration

    t2v = resolve_calibration(tmp_path / "wan2.1_t2v_1.3B_fp16.safetensors", TASKS["t2v-1.3B"].dit, 480, 832)
    assert t2v is not None and t2v.teacache_coefficients == PUBLISHED_TEACACHE[("t2v-1.3B", "")]
    assert t2v.supports("teacache") and not t2v.supports("magcache")
    assert not StepCacheSettings("magcache", 0.02, t2v).active and StepCacheSettings("teacache", 0.1, t2v).active
    i2v = TASKS["i2v-14B"].dit
    assert published_calibration(i2v, 480, 832).teacache_coefficients == PUBLISHED_TEACACHE[("i2v-14B", "480p")]
    assert published_calibration(i2v, 720, 1280).teacache_coefficients == PUBLISHED_TEACACHE[("i2v-14B", "720p")]
    assert published_calibration(TASKS["t2v-14B"].dit, 720, 1280, wan22=True) is None
    assert published_calibration(TASKS["ti2v-5B"].dit, 704, 1280) is None
    toy = load_dit(TOY_MODEL_DIR / TOY_FILES["dit"], dtype=torch.float32).config
    assert published_calibration(toy, 64, 64) is None
    stored = CacheCalibration(steps=4, teacache_coefficients=(1.0, 0.0), magcache_ratios={})
    stored.save(calibration_path(tmp_path / "dit.safetensors"))
    assert resolve_calibration(tmp_path / "dit.safetensors", TASKS["t2v-1.3B"].dit, 480, 832) == stored
