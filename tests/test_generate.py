"""End-to-end tests of `python -m wan_core.generate` on a tiny random model set (CPU)."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.model_set import DIT_KINDS, write_model_set
from wan_core.generate import cli
from wan_core.generate.cli import main
from wan_core.generate.outputs import load_latent
from wan_core.lora.formats import LowRank, save_lora
from wan_core.media.io import write_video

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return write_model_set(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / "start.png")
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / "end.png")
    write_video(torch.rand(9, 32, 32, 3), folder / "control.mp4", fps=16)
    return {"start": folder / "start.png", "end": folder / "end.png", "control": folder / "control.mp4"}


def _args(models, kind: str, out: Path, *extra: str) -> list[str]:
    base = ["--dit", str(models[f"dit_{kind}"]), "--vae", str(models["vae"]), "--t5", str(models["t5"]),
            "--clip", str(models["clip"]), "--video_size", "32", "32", "--video_length", "5", "--infer_steps", "2",
            "--save_path", str(out), "--quiet", "--device", "cpu"]
    return base + list(extra)


def _frames(path: Path) -> tuple[int, int, int]:
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return len(frames), frames[0].shape[0], frames[0].shape[1]


def _only(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def test_t2v_writes_video_and_latent_with_settings(models, tmp_path):
    assert main(_args(models, "t2v", tmp_path, "--prompt", "a red square moving right --d 3",
                      "--output_type", "both", "--guidance_scale", "4.0")) == 0
    assert _frames(_only(tmp_path, "*.mp4")) == (5, 32, 32)
    latent, meta = load_latent(_only(tmp_path, "*_latent.safetensors"))
    assert latent.shape == (1, 16, 2, 4, 4)
    assert (meta["seeds"], meta["prompt"], meta["video_length"], meta["guidance_scale"]) == (
        3, "a red square moving right", 5, 4.0)
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_same_seed_gives_bit_identical_latents(models, tmp_path):
    for name in ("a", "b", "c"):
        seed = "7" if name != "c" else "8"
        main(_args(models, "t2v", tmp_path / name, "--prompt", "a blue circle", "--seed", seed,
                   "--output_type", "latent"))
    a, b, c = (load_latent(_only(tmp_path / n, "*.safetensors"))[0] for n in "abc")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_t2i_writes_one_png(models, tmp_path):
    assert main(_args(models, "t2v", tmp_path, "--task", "t2i-14B", "--prompt", "a cat", "--output_type",
                      "images")) == 0
    assert [p.name for p in _only(tmp_path, "*").iterdir()] == ["frame_0000.png"]


def test_i2v_size_follows_the_image_aspect(models, media, tmp_path):
    # area 32x32 at the image's 48:64 aspect -> latent 2x4 (sides even) -> 16x32 pixels
    assert main(_args(models, "i2v", tmp_path, "--prompt", "a cat", "--image_path", str(media["start"]))) == 0
    assert _frames(_only(tmp_path, "*.mp4")) == (5, 16, 32)


def test_end_image_adds_a_latent_frame_and_trim(models, media, tmp_path):
    assert main(_args(models, "i2v", tmp_path, "--prompt", "a cat", "--image_path", str(media["start"]),
                      "--end_image_path", str(media["end"]), "--trim_tail_frames", "3")) == 0
    assert _frames(_only(tmp_path, "*.mp4"))[0] == 5 + 4 - 3


def test_flf2v(models, media, tmp_path):
    assert main(_args(models, "flf2v", tmp_path, "--prompt", "a cat", "--image_path", str(media["start"]),
                      "--end_image_path", str(media["end"]))) == 0
    assert _frames(_only(tmp_path, "*.mp4"))[0] == 5


@pytest.mark.parametrize("with_image", [False, True])
def test_fun_control(models, media, tmp_path, with_image):
    extra = ["--image_path", str(media["start"])] if with_image else []
    assert main(_args(models, "fc", tmp_path, "--prompt", "a cat", "--control_path", str(media["control"]),
                      *extra)) == 0
    assert _frames(_only(tmp_path, "*.mp4")) == (5, 32, 32)


def test_fun_control_too_few_frames(models, media, tmp_path, capsys):
    assert main(_args(models, "fc", tmp_path, "--prompt", "a cat", "--control_path", str(media["control"]),
                      "--video_length", "13")) == 2
    assert "control video has 9 frames but 13 are needed" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--video_length", "6"], "video length must be 4n+1"),
    (["--video_size", "30", "32"], "height must be a positive multiple of 16 (got 30; try 16 or 32)"),
    (["--video_size", "-16", "32"], "height must be a positive multiple of 16 (got -16; try 16)\n"),
    (["--video_size", "5", "32"], "height must be a positive multiple of 16 (got 5; try 16)\n"),
    (["--video_length", "-3"], "video length must be 4n+1 frames, e.g. 1, 5, 9, ..., 81 (got -3; try 1)\n"),
    (["--image_path", "missing.png"], "missing.png"),
    (["--cfg_skip_mode", "late", "--cfg_apply_ratio", "1.5"], "ratio"),
])
def test_bad_input_fails_before_any_model_runs(models, tmp_path, capsys, argv, message):
    args = _args(models, "t2v", tmp_path, "--prompt", "a cat", "--task", "t2v-1.3B", *argv)
    args[1] = str(tmp_path / "no_such_dit.safetensors")  # a model load would fail differently
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_task_model_mismatch(models, media, tmp_path, capsys):
    assert main(_args(models, "t2v", tmp_path, "--task", "i2v-14B", "--prompt", "a cat",
                      "--image_path", str(media["start"]))) == 2
    assert "task 'i2v-14B' needs a i2v model with 36 input channels" in capsys.readouterr().err
    assert main(_args(models, "i2v", tmp_path, "--prompt", "a cat")) == 2
    assert "give a start image with --image_path" in capsys.readouterr().err


def _random_lora(seed: int) -> dict[str, LowRank]:
    gen = torch.Generator().manual_seed(seed)
    cfg = DIT_KINDS["t2v"]
    return {f"blocks.{i}.{name}": LowRank(torch.randn(4, cfg.dim, generator=gen), torch.randn(cfg.dim, 4,
                                                                                              generator=gen), 2.0)
            for i in range(cfg.num_layers) for name in ("self_attn.q", "cross_attn.v", "ffn.2")
            if name != "ffn.2"}


def test_lora_formats_give_the_same_video(models, tmp_path):
    lora = _random_lora(1)
    outs = {}
    for fmt in ("musubi", "comfyui", "diffusers", None):
        extra = []
        if fmt:
            path = save_lora(lora, tmp_path / f"{fmt}.safetensors", fmt)
            extra = ["--lora_weight", str(path), "--lora_multiplier", "0.5"]
        main(_args(models, "t2v", tmp_path / str(fmt), "--prompt", "a cat", "--seed", "1", "--output_type", "latent",
                   *extra))
        outs[fmt] = load_latent(_only(tmp_path / str(fmt), "*.safetensors"))[0]
    torch.testing.assert_close(outs["musubi"], outs["comfyui"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["musubi"], outs["diffusers"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outs["musubi"], outs[None])


def test_lora_exclude_everything_equals_base(models, tmp_path):
    path = save_lora(_random_lora(2), tmp_path / "l.safetensors", "musubi")
    for name, extra in (("base", []), ("excluded", ["--lora_weight", str(path), "--exclude_patterns", "blocks_"])):
        main(_args(models, "t2v", tmp_path / name, "--prompt", "a cat", "--seed", "1", "--output_type", "latent",
                   *extra))
    a, b = (load_latent(_only(tmp_path / n, "*.safetensors"))[0] for n in ("base", "excluded"))
    assert torch.equal(a, b)


def test_batch_file_and_latent_decoding(models, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two videos\na red square --d 1 --f 9\n\na blue circle --d 2 --s 1 --g 1.0\n")
    assert main(_args(models, "t2v", tmp_path / "out", "--from_file", str(prompts), "--output_type", "both")) == 0
    videos = sorted((tmp_path / "out").glob("*.mp4"))
    assert sorted(_frames(v)[0] for v in videos) == [5, 9]
    latents = sorted((tmp_path / "out").glob("*_latent.safetensors"))
    assert main(_args(models, "t2v", tmp_path / "decoded", "--latent_path", *map(str, latents))) == 0
    assert sorted(_frames(v)[0] for v in (tmp_path / "decoded").glob("*.mp4")) == [5, 9]


def test_interactive_mode_through_a_pipe(models, tmp_path):
    argv = [sys.executable, "-m", "wan_core.generate", *_args(models, "t2v", tmp_path, "--interactive")]
    result = subprocess.run(argv, input="a red square --d 1\n\nnot an option --zz 1\na blue circle --d 2\n",
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "unknown inline option --zz" in result.stderr
    assert len(list(tmp_path.glob("*.mp4"))) == 2


def test_memory_flags(models, tmp_path, capsys):
    lora = str(save_lora(_random_lora(3), tmp_path / "l.safetensors", "musubi"))
    runs = {"base": [], "swap": ["--blocks_to_swap", "1"], "fp8": ["--fp8"], "fp8_scaled": ["--fp8", "--fp8_scaled"],
            "lora_fp8": ["--fp8", "--fp8_scaled", "--lora_weight", lora, "--lora_multiplier", "0"]}
    out = {}
    for name, extra in runs.items():
        assert main(_args(models, "t2v", tmp_path / name, "--prompt", "a cat", "--seed", "1", "--output_type",
                          "latent", *extra)) == 0, capsys.readouterr().err
        out[name] = load_latent(_only(tmp_path / name, "*.safetensors"))[0]
    assert torch.equal(out["swap"], out["base"])  # streaming blocks changes nothing
    err = {k: ((out[k] - out["base"]).abs().max() / out["base"].abs().max()).item() for k in ("fp8", "fp8_scaled")}
    assert 0 < err["fp8_scaled"] < 0.1 and 0 < err["fp8"] < 0.2, err
    assert torch.equal(out["lora_fp8"], out["fp8_scaled"])  # merged at strength 0, then quantised the same way
    assert main(_args(models, "t2v", tmp_path, "--prompt", "a cat", "--blocks_to_swap", "2")) == 2
    assert "blocks_to_swap" in capsys.readouterr().err


def test_save_merged_model_equals_lora_at_load(models, tmp_path):
    lora = save_lora(_random_lora(4), tmp_path / "l.safetensors", "comfyui")
    merged = tmp_path / "merged.safetensors"
    assert main(_args(models, "t2v", tmp_path, "--lora_weight", str(lora), "--lora_multiplier", "0.7",
                      "--save_merged_model", str(merged))) == 0
    runs = {"merged": ["--dit", str(merged)], "lora": ["--lora_weight", str(lora), "--lora_multiplier", "0.7"]}
    for name, extra in runs.items():
        argv = _args(models, "t2v", tmp_path / name, "--prompt", "a cat", "--seed", "5", "--output_type", "latent")
        assert main(argv + extra) == 0
    a, b = (load_latent(_only(tmp_path / n, "*.safetensors"))[0] for n in runs)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------------
# Bad files, outputs and options: one line, before any model loads
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if the CLI loads any model."""
    from wan_core.loading import model_set as model_module

    def refuse(self, kind):
        raise AssertionError(f"{kind} was loaded before the bad input was reported")

    monkeypatch.setattr(model_module.ModelSet, "get", refuse)


TOY = Path(__file__).resolve().parents[1] / "wan_core" / "toy_models"


@pytest.mark.parametrize("kind, file, name", [
    ("vae", "wan21_toy_vae.safetensors", "Wan VAE"), ("t5", "wan21_toy_umt5.safetensors", "umT5 text encoder"),
    ("clip", "wan21_toy_clip_vision.safetensors", "CLIP vision encoder"),
    ("lora", "wan21_toy_purple_lora.safetensors", "LoRA"),
])
def test_a_dit_flag_given_another_kind_of_file_says_which(tmp_path, capsys, no_model_loads, kind, file, name):
    expected = "is a {} file; --dit expects a Wan2.1 DiT (diffusion transformer) file\n"
    assert main(["--dit", str(TOY / file), "--prompt", "x", "--save_path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --dit {TOY / file} " + expected.format(name)
    plain = tmp_path / f"plain_{file}"  # no config metadata: recognised from the key names
    save_file(load_file(TOY / file), plain)
    assert main(["--dit", str(plain), "--prompt", "x", "--save_path", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: --dit {plain} " + expected.format(name)


def test_other_model_flags_given_a_dit_say_which(tmp_path, capsys, no_model_loads):
    dit = TOY / "wan21_toy_t2v_dit.safetensors"
    for flag, name in (("--vae", "Wan VAE"), ("--t5", "umT5 text encoder"), ("--clip", "CLIP vision encoder"),
                       ("--lora_weight", "LoRA")):
        assert main([flag, str(dit), "--prompt", "x", "--save_path", str(tmp_path)]) == 2
        assert capsys.readouterr().err == (f"error: {flag} {dit} is a Wan2.1 DiT (diffusion transformer) file; "
                                           f"{flag} expects a {name} file\n")


def test_unusable_output_paths_fail_before_any_model_loads(tmp_path, capsys, monkeypatch, no_model_loads):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [(["--save_path", str(afile)], f"--save_path {afile} is a file; expected a folder"),
             (["--save_path", str(afile / "sub")], f"--save_path {afile / 'sub'} lies under the file {afile}"),
             (["--save_merged_model", str(afile / "m.safetensors")],
              f"--save_merged_model {afile / 'm.safetensors'}: its folder {afile} is a file"),
             (["--save_merged_model", str(tmp_path)], f"--save_merged_model {tmp_path} is a folder")]
    for extra, message in cases:
        assert main(["--prompt", "x", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    import wan_core.loading.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint.os, "access", lambda path, mode: False)  # root ignores chmod: fake the refusal
    assert main(["--prompt", "x", "--save_path", str(tmp_path / "new")]) == 2
    assert capsys.readouterr().err == f"error: --save_path {tmp_path / 'new'} is not writable (no write permission)\n"


@pytest.mark.parametrize("fps", ["0", "-5"])
def test_fps_must_be_positive(tmp_path, capsys, no_model_loads, fps):
    assert main(["--prompt", "x", "--fps", fps, "--save_path", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: --fps must be a positive frame rate (e.g. 16), got {fps}\n"


def test_a_clip_file_unused_by_the_task_is_reported(models, tmp_path, caplog):
    pickle = tmp_path / "clip.pth"
    torch.save(load_file(models["clip"]), pickle)
    argv = _args(models, "t2v", tmp_path / "out", "--prompt", "a cat", "--output_type", "latent")
    argv[argv.index("--clip") + 1] = str(pickle)
    with caplog.at_level("WARNING"):
        assert main(argv) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"warning: --clip {pickle} is not used: CLIP vision encodes a start image (--image_path / "
                        "--i), which no prompt of this t2v-1.3B run has"]


def test_sigint_while_sampling_prints_one_line_and_exits_130(models, tmp_path):
    import os
    import signal

    out = tmp_path / "out"
    argv = [sys.executable, "-m", "wan_core.generate", *_args(models, "t2v", out, "--prompt", "a cat",
                                                              "--infer_steps", "1000000")]
    argv.remove("--quiet")  # the progress lines tell when sampling started
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines: queue.Queue[bytes] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(b) for b in iter(proc.stderr.readline, b"")], daemon=True)
    reader.start()
    try:
        seen = b""
        while b"sampling video 1/1" not in seen:
            seen += lines.get(timeout=120)  # queue.Empty fails the test when sampling never starts
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        reader.join(timeout=30)
        stdout = proc.stdout.read()
    finally:
        proc.kill()
    text = (seen + b"".join(lines.get() for _ in range(lines.qsize()))).decode()
    assert proc.returncode == 130, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    last = text.rstrip("\n").split("\n")[-1].split("\r")[-1]  # the progress bar redraws with carriage returns
    assert re.fullmatch(r"interrupted at step \d+ of 1000000 \(video 1 of 1\), nothing written", last), text
    assert text.count("interrupted") == 1 and stdout == b"" and list(out.iterdir()) == []


def test_ctrl_c_that_a_library_turns_into_another_error_is_still_reported_as_the_interrupt(monkeypatch, capsys):
    def loading(args):  # a C extension checking signals inside a call can replace the KeyboardInterrupt
        try:
            cli._on_sigint(signal.SIGINT, None)
        except KeyboardInterrupt:
            raise RuntimeError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None

    monkeypatch.setattr(cli, "spec_from_args", loading)
    assert main(["--prompt", "a cat"]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "interrupted while loading models, nothing written" and "error:" not in err
    assert signal.getsignal(signal.SIGINT) is not cli._on_sigint  # the previous handler is back


def test_ctrl_c_swallowed_before_sampling_stops_the_run_at_the_next_step(monkeypatch) -> None:
    monkeypatch.setattr(cli, "STATUS", cli.RunStatus(interrupted=True))  # e.g. raised in a finalizer: only printed
    progress = cli.Progress(5, "sampling", disable=True)
    with pytest.raises(KeyboardInterrupt):
        progress(type("Info", (), {"i": 0, "total": 5})())
    assert cli.STATUS.step == 0


def test_leftovers_of_killed_writes_are_cleaned_on_the_next_run(models, tmp_path):
    import os

    from wan_core.loading.checkpoint import STALE_TEMP_SECONDS, make_temp, temp_target

    out = tmp_path / "out"
    out.mkdir()
    old = time.time() - STALE_TEMP_SECONDS - 60
    stale = [out / ".a.mp4.k3j9x_2q.tmp.mp4", out / ".b_latent.safetensors.abcdefgh.tmp",
             out / ".sample.png.12345678.tmp.png"]
    fresh = out / ".c.mp4.zzzzzzzz.tmp.mp4"  # a concurrent writer's file
    others = [out / "notes.tmp", out / ".hidden.tmp", out / ".x.mp4.short.tmp", out / "kept.mp4"]
    for path in [*stale, fresh, *others]:
        path.write_bytes(b"")
    frames = out / ".frames.q1w2e3r4.tmp"  # a PNG-frames folder
    frames.mkdir()
    (frames / "frame_0000.png").write_bytes(b"")
    for path in [*stale, frames, *others]:
        os.utime(path, (old, old))
    assert main(_args(models, "t2v", out, "--prompt", "a cat", "--output_type", "latent")) == 0
    left = {p.name for p in out.iterdir()}
    assert not {p.name for p in [*stale, frames]} & left
    assert {p.name for p in [fresh, *others]} <= left
    assert len([n for n in left if n.endswith("_latent.safetensors")]) == 1
    for ext, directory in (("", False), (".png", False), (".mp4", False), ("", True)):  # every writer's naming
        tmp = make_temp(tmp_path / "t" / "name.x", ext=ext, directory=directory)
        assert temp_target(tmp.name) == "name.x" and tmp.name.endswith(f".tmp{ext}")
