"""Writes the example workflows in both ComfyUI formats from one description per graph.

    python example_workflows/build_workflows.py          # rewrite example_workflows/*.json and api/*.json

UI format (`<name>.json`, what the editor loads; shown under the pack's templates) and API format
(`api/<name>.json`, what POST /prompt and examples/api_batch.py take). Widget order and socket types come from the
node classes' INPUT_TYPES, so the files follow the nodes; tests/test_nodes_workflows.py checks that the committed
files equal this script's output and agree with INPUT_TYPES.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
from wan_core.loading.model_set import TOY_EXPERT_FILES, TOY_MODEL_DIR, sampling_defaults  # noqa: E402
from wan_core.models.config import DEFAULT_NEGATIVE_PROMPT  # noqa: E402
from wan_core.sampling.experts import expert_for  # noqa: E402
from wan_core.sampling.solvers import get_schedule  # noqa: E402

HERE = Path(__file__).resolve().parent
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")

# ComfyUI core nodes the examples use: (socket inputs, widget names, outputs). Kept to the few used here.
NATIVE: dict[str, tuple[dict[str, str], list[str], list[tuple[str, str]]]] = {
    "LoadImage": ({}, ["image", "upload"], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "RepeatImageBatch": ({"image": "IMAGE"}, ["amount"], [("IMAGE", "IMAGE")]),
    "PreviewImage": ({"images": "IMAGE"}, [], []),
}
TOY = {"t2v": "wan21_toy_t2v_dit.safetensors", "i2v": "wan21_toy_i2v_dit.safetensors",
       "flf2v": "wan21_toy_flf2v_dit.safetensors", "fc": "wan21_toy_fun_control_dit.safetensors",
       "t5": "wan21_toy_umt5.safetensors", "vae": "wan21_toy_vae.safetensors",
       "clip": "wan21_toy_clip_vision.safetensors", "lora": "wan21_toy_purple_lora.safetensors",
       "t2v_high": TOY_EXPERT_FILES["t2v-A14B"][0], "t2v_low": TOY_EXPERT_FILES["t2v-A14B"][1]}
SIZE = {"width": 64, "height": 64, "length": 9}  # the toy world: 64x64 clips of 9 frames
NOTE_FILES = (
    "The loaders point at the embedded toy models (wan21_toy_*), which run anywhere in seconds and draw simple "
    "moving shapes. For real Wan2.1 weights put the files in ComfyUI's models folder and pick them in the "
    "loaders:\n"
    "- models/diffusion_models: the DiT, e.g. {dit}\n"
    "- models/text_encoders: umt5_xxl_fp16.safetensors or umt5_xxl_fp8_e4m3fn_scaled.safetensors (the official "
    "models_t5_umt5-xxl-enc-bf16.pth works too)\n"
    "- models/vae: wan_2.1_vae.safetensors (or Wan2.1_VAE.pth)\n"
    "{clip}"
    "- models/loras: your LoRA files (musubi, ComfyUI, diffusers or PEFT keys)\n"
    "Then set a real size ({size}), 81 frames, 30-50 steps and shift {shift}."
)
CLIP_LINE = "- models/clip_vision: clip_vision_h.safetensors\n"
DATASET_FOLDER = "wantuner_dataset/videos"  # inside ComfyUI's input folder
NOTE_TRAINING = (
    "Training data: a folder of clips (or images) with same-named .txt captions, e.g. clip01.mp4 + clip01.txt, "
    "inside ComfyUI's input folder ({folder} here) or any absolute path; a musubi dataset .toml works too. A toy "
    "dataset of purple shapes (the colour the toy DiT never saw) for the embedded toy models:\n"
    "python -c \"from wan_core.toy.world import all_combos, write_dataset; write_dataset('ComfyUI/input/"
    "wantuner_dataset', all_combos(['purple']), 4, seed=0, fmt='mp4')\"\n"
    "Cache Dataset encodes the clips once (re-used until files, captions or settings change); Train LoRA writes "
    "models/loras/{lora} and shows the loss live; the LoRA loader picks the new file up in the same run. For real "
    "Wan2.1 weights use 480p-ish sizes (e.g. 832x480, 33-81 frames), learning rate 1e-4..2e-4, rank 16-32, "
    "1000-3000 steps, gradient checkpointing on; on a 24 GB GPU add fp8_base and blocks_to_swap for 14B models."
)
TRAINED_LORA = "wantuner/toy_purple.safetensors"


@dataclass
class Node:
    id: int
    type: str
    widgets: dict[str, Any] = field(default_factory=dict)
    links: dict[str, tuple[int, int]] = field(default_factory=dict)  # input -> (source node id, output slot)
    title: str | None = None


# ----------------------------------------------------------------------------------------------------------------
# Graphs
# ----------------------------------------------------------------------------------------------------------------


def _loaders(dit: str, clip: bool) -> list[Node]:
    nodes = [
        Node(1, "WanTunerDiTLoader", {"model_name": TOY[dit], "task": "auto", "dtype": "default", "fp8": "none",
                                      "attention": "sdpa", "blocks_to_swap": 0, "compile": False}),
        Node(2, "WanTunerT5Loader", {"model_name": TOY["t5"], "dtype": "default", "fp8": False, "tokenizer": ""}),
        Node(3, "WanTunerVAELoader", {"model_name": TOY["vae"], "dtype": "fp32", "cache_on_cpu": False,
                                      "tiling": "auto"}),
        Node(4, "WanTunerTextEncode", {"prompt": "a red circle moving right",
                                       "negative_prompt": ""}, {"t5": (2, 0)}),
    ]
    if clip:
        nodes.append(Node(5, "WanTunerCLIPVisionLoader", {"model_name": TOY["clip"], "dtype": "default"}))
    return nodes


SAMPLER_EXTRAS = {"boundary": -1.0, "guidance_scale_high_noise": -1.0, "start_step": 0, "end_step": 10000,
                  "cache_mode": "none", "cache_threshold": 0.0}


def _sampler(node_id: int, dit: tuple[int, int], cond: tuple[int, int] | None, steps: int = 8,
             shift: float = 5.0, guidance_scale: float = 5.0, solver: str = "unipc", size: dict | None = None,
             **extras: Any) -> Node:
    links = {"dit": dit, "text_embeds": (4, 0), "vae": (3, 0)}
    if cond is not None:
        links["conditioning"] = cond
    if "high_noise_dit" in extras:
        links["high_noise_dit"] = extras.pop("high_noise_dit")
    return Node(node_id, "WanTunerSampler", {
        **(size or SIZE), "steps": steps, "guidance_scale": guidance_scale, "shift": shift, "solver": solver,
        "seed": 42, "noise_on_cpu": False, "cfg_skip_mode": "none", "cfg_apply_ratio": 0.5, "slg_mode": "none",
        "slg_layers": "1", "slg_scale": 3.0, "slg_start": 0.0, "slg_end": 0.3, "denoise": 1.0,
        **SAMPLER_EXTRAS, **extras}, links)


def _decode_save(first_id: int, sampler_id: int, prefix: str, fps: int = 16) -> list[Node]:
    return [Node(first_id, "WanTunerVAEDecode", {}, {"vae": (3, 0), "latent": (sampler_id, 0)}),
            Node(first_id + 1, "WanTunerSaveVideo", {"fps": fps, "filename_prefix": f"WanTuner/{prefix}", "crf": 0},
                 {"images": (first_id, 0)})]


def _note(node_id: int, dit: str, clip: bool = False, size: str = "832x480", shift: str = "5.0") -> Node:
    text = NOTE_FILES.format(dit=dit, clip=CLIP_LINE if clip else "", size=size, shift=shift)
    return Node(node_id, "Note", {"text": text}, title="Which model files go where")


def t2v() -> list[Node]:
    return [*_loaders("t2v", clip=False), _sampler(10, (1, 0), None), *_decode_save(11, 10, "t2v"),
            _note(20, "wan2.1_t2v_1.3B_fp16.safetensors")]


def i2v() -> list[Node]:
    return [
        *_loaders("i2v", clip=True),
        Node(6, "LoadImage", {"image": "example.png", "upload": "image"}, title="Start image"),
        Node(7, "WanTunerCLIPVisionEncode", {"crop": "none"}, {"clip_vision": (5, 0), "image": (6, 0)}),
        Node(8, "WanTunerImageToVideo", {**SIZE, "size_from_image": True},
             {"vae": (3, 0), "start_image": (6, 0), "image_embeds": (7, 0)}),
        _sampler(10, (1, 0), (8, 0), shift=3.0), *_decode_save(11, 10, "i2v"),
        _note(20, "wan2.1_i2v_480p_14B_fp16.safetensors", clip=True, shift="3.0 (480p) or 5.0 (720p)"),
    ]


def flf2v() -> list[Node]:
    return [
        *_loaders("flf2v", clip=True),
        Node(6, "LoadImage", {"image": "example.png", "upload": "image"}, title="Start image"),
        Node(9, "LoadImage", {"image": "example.png", "upload": "image"}, title="End image"),
        Node(7, "WanTunerCLIPVisionEncode", {"crop": "none"},
             {"clip_vision": (5, 0), "image": (6, 0), "end_image": (9, 0)}),
        Node(8, "WanTunerFirstLastFrame", dict(SIZE),
             {"vae": (3, 0), "start_image": (6, 0), "end_image": (9, 0), "image_embeds": (7, 0)}),
        _sampler(10, (1, 0), (8, 0)), *_decode_save(11, 10, "flf2v"),
        _note(20, "wan2.1_flf2v_720p_14B_fp16.safetensors", clip=True, size="1280x720"),
    ]


def fun_control() -> list[Node]:
    return [
        *_loaders("fc", clip=True),
        Node(6, "LoadImage", {"image": "example.png", "upload": "image"}, title="Start image"),
        Node(9, "RepeatImageBatch", {"amount": SIZE["length"]}, {"image": (6, 0)},
             title="Control video (replace with Load Video + a preprocessor)"),
        Node(7, "WanTunerCLIPVisionEncode", {"crop": "none"}, {"clip_vision": (5, 0), "image": (6, 0)}),
        Node(8, "WanTunerFunControl", dict(SIZE),
             {"vae": (3, 0), "control_video": (9, 0), "start_image": (6, 0), "image_embeds": (7, 0)}),
        _sampler(10, (1, 0), (8, 0)), *_decode_save(11, 10, "fun_control"),
        _note(20, "Wan2.1-Fun-1.3B-Control (alibaba-pai; its diffusion_pytorch_model.safetensors)", clip=True),
    ]


def lora() -> list[Node]:
    loaders = _loaders("t2v", clip=False)
    loaders[3].widgets["prompt"] = "a purple circle moving right"  # the toy LoRA teaches purple
    return [
        *loaders,
        Node(6, "WanTunerLoRALoader", {"lora_name": TOY["lora"], "strength": 1.0, "include": "self_attn|ffn",
                                       "exclude": "blocks_1_ffn"}, {"dit": (1, 0)}, title="LoRA (attention only)"),
        Node(7, "WanTunerLoRALoader", {"lora_name": TOY["lora"], "strength": 0.5, "include": "cross_attn",
                                       "exclude": ""}, {"dit": (6, 0)}, title="LoRA (cross-attention, half)"),
        _sampler(10, (7, 0), None), *_decode_save(11, 10, "lora"),
        _note(20, "wan2.1_t2v_1.3B_fp16.safetensors"),
    ]


NOTE_FEWSTEP = (
    "Few-step sampling for the step/CFG-distilled LoRAs (lightx2v, CausVid): load the LoRA on the DiT (the toy "
    "LoRA stands in for it here), then sample with solver flowmatch_distill, 4 steps (timesteps 1000, 750, 500, "
    "250), guidance 1.0 (one model pass per step, no negative prompt pass) and shift 5-8. Full-weight keys in "
    "those files (.diff on norms and the head, .diff_b on biases) are loaded too."
)


def fewstep() -> list[Node]:
    """4-step, guidance-1 sampling as the distilled LoRAs expect it."""
    return [
        *_loaders("t2v", clip=False),
        Node(6, "WanTunerLoRALoader", {"lora_name": TOY["lora"], "strength": 1.0, "include": "", "exclude": ""},
             {"dit": (1, 0)}, title="Few-step LoRA (lightx2v / CausVid)"),
        _sampler(10, (6, 0), None, steps=4, guidance_scale=1.0, solver="flowmatch_distill"),
        *_decode_save(11, 10, "fewstep"),
        _note(20, "wan2.1_t2v_14B_fp16.safetensors"),
        Node(21, "Note", {"text": NOTE_FEWSTEP}, title="Few-step settings"),
    ]


def _dit_loader(node_id: int, name: str, task: str, title: str) -> Node:
    widgets = {"model_name": name, "task": task, "dtype": "default", "fp8": "none", "attention": "sdpa",
               "blocks_to_swap": 0, "compile": False}
    return Node(node_id, "WanTunerDiTLoader", widgets, title=title)


def _official_loaders(dit: str, task: str, vae: str) -> list[Node]:
    """Loaders naming the official (Comfy-Org repackaged) files; the prompt is a real-world one."""
    nodes = _loaders("t2v", clip=False)
    nodes[0] = _dit_loader(1, dit, task, "DiT (low-noise expert)" if "A14B" in task else "DiT")
    nodes[1].widgets["model_name"] = "umt5_xxl_fp16.safetensors"
    nodes[2].widgets["model_name"] = vae
    nodes[3].widgets.update(prompt="a red fox running through fresh snow at sunrise, cinematic",
                            negative_prompt=DEFAULT_NEGATIVE_PROMPT)
    return nodes


NOTE_T2V_A14B = (
    "Wan2.2 T2V-A14B: two experts of the Wan2.1 14B architecture. The high-noise expert runs the steps whose "
    "timestep is at or above the boundary, the low-noise expert the rest; each has its own guidance scale and its "
    "own LoRA chain. The loaders point at the toy expert pair (wan22_toy_t2v_*), fine-tuned from the toy T2V DiT on "
    "the two sides of its boundary; boundary and high-noise guidance at -1 take the values stored in the low-noise "
    "expert's file (for the official models, the task's: boundary 0.875 of 1000, guidance 4.0 high / 3.0 low). "
    "For the real models put wan2.2_t2v_high_noise_14B_fp16.safetensors and "
    "wan2.2_t2v_low_noise_14B_fp16.safetensors (or the fp8_scaled files) in models/diffusion_models, "
    "wan_2.1_vae.safetensors in models/vae and umt5_xxl_fp16.safetensors in models/text_encoders; then 1280x720 "
    "(or 832x480), 81 frames, 40 steps, shift 12, guidance 3.0. With both experts resident a 14B pair needs about "
    "twice the memory of one DiT: on smaller GPUs use blocks_to_swap, fp8, or two chained samplers (see the I2V-A14B "
    "example), which let ComfyUI offload the idle expert."
)


def toy_pair_sampling() -> dict[str, float | int]:
    """Steps, shift and low-noise guidance stored in the shipped toy low-noise expert (the recipe's choice)."""
    stored = sampling_defaults(TOY_MODEL_DIR / TOY["t2v_low"])
    if not stored:
        raise FileNotFoundError(f"{TOY['t2v_low']} (with its wantuner_sampling metadata) is not in {TOY_MODEL_DIR}")
    return {"steps": int(stored["infer_steps"]), "shift": float(stored["flow_shift"]),
            "guidance_scale": float(stored["guidance_scale"])}


def t2v_a14b() -> list[Node]:
    """One sampler with both toy experts; boundary and high-noise guidance from the low-noise expert's file."""
    loaders = _loaders("t2v_low", clip=False)
    loaders[0].title = "DiT (low-noise expert)"
    return [
        *loaders,
        _dit_loader(6, TOY["t2v_high"], "auto", "DiT (high-noise expert)"),
        _sampler(10, (1, 0), None, **toy_pair_sampling(), high_noise_dit=(6, 0)),
        *_decode_save(11, 10, "t2v_a14b"),
        Node(20, "Note", {"text": NOTE_T2V_A14B}, title="Wan2.2 T2V-A14B: two experts"),
    ]


I2V_A14B_SIZE = {"width": 1280, "height": 720, "length": 81}
I2V_A14B = {"steps": 40, "shift": 5.0, "boundary": 0.9, "guidance": 3.5}
NOTE_I2V_A14B = (
    "Wan2.2 I2V-A14B as ComfyUI's own Wan2.2 workflows run it: two samplers. The first (high-noise expert, "
    "guidance {guidance}) runs steps 0-{switch} and returns the still-noisy latent (end_step {switch}); the "
    "second (low-noise expert) continues from it at start_step {switch} with the same steps, solver and shift. "
    "Step {switch} is where the timestep of the {steps}-step unipc schedule at shift {shift} falls below the "
    "boundary {boundary}. One sampler with high_noise_dit connected does the same in one node. I2V-A14B has no CLIP "
    "branch: the image-to-video node takes no image_embeds. Files: wan2.2_i2v_high_noise_14B_fp16.safetensors and "
    "wan2.2_i2v_low_noise_14B_fp16.safetensors in models/diffusion_models, wan_2.1_vae.safetensors in models/vae, "
    "umt5_xxl_fp16.safetensors in models/text_encoders. No toy files exist for I2V-A14B yet."
)


def i2v_a14b_switch_step() -> int:
    """The first step of the low-noise expert: the boundary rule on the schedule's timesteps."""
    timesteps = get_schedule("unipc", I2V_A14B["steps"], I2V_A14B["shift"]).timesteps.tolist()
    return next(i for i, t in enumerate(timesteps) if expert_for(t, I2V_A14B["boundary"]) == "low")


def i2v_a14b() -> list[Node]:
    """Two chained samplers (end_step / start_step), one per expert, on the official files."""
    k, cfg = i2v_a14b_switch_step(), I2V_A14B
    common = {"steps": cfg["steps"], "shift": cfg["shift"], "guidance_scale": cfg["guidance"], "size": I2V_A14B_SIZE}
    first = _sampler(9, (5, 0), (8, 0), end_step=k, **common)
    first.title = "Sampler 1: high-noise expert"
    second = _sampler(10, (1, 0), (8, 0), start_step=k, **common)
    second.title, second.links["latent"] = "Sampler 2: low-noise expert", (9, 0)
    return [
        *_official_loaders("wan2.2_i2v_low_noise_14B_fp16.safetensors", "i2v-A14B", "wan_2.1_vae.safetensors"),
        _dit_loader(5, "wan2.2_i2v_high_noise_14B_fp16.safetensors", "i2v-A14B", "DiT (high-noise expert)"),
        Node(6, "LoadImage", {"image": "example.png", "upload": "image"}, title="Start image"),
        Node(8, "WanTunerImageToVideo", {**I2V_A14B_SIZE, "size_from_image": True},
             {"vae": (3, 0), "start_image": (6, 0)}),
        first, second, *_decode_save(11, 10, "i2v_a14b"),
        Node(20, "Note", {"text": NOTE_I2V_A14B.format(switch=k, **cfg)}, title="Wan2.2 I2V-A14B: two samplers"),
    ]


TI2V_SIZE = {"width": 1280, "height": 704, "length": 121}
NOTE_TI2V = (
    "Wan2.2 TI2V-5B image-to-video: one 5B DiT on the Wan2.2 VAE's 48-channel latents (16x16 pixels per latent "
    "cell: width and height multiples of 32). The TI2V-5B Image to Video node encodes the start image into the "
    "first latent frame (the video takes the image's aspect ratio at about width x height pixels); disconnect it "
    "from the sampler for text-to-video. Official settings: 1280x704 or 704x1280, 121 frames at 24 fps, 50 "
    "steps, shift 5, guidance 5. Files: wan2.2_ti2v_5B_fp16.safetensors in models/diffusion_models, "
    "wan2.2_vae.safetensors in models/vae (the Wan2.1 VAE does not fit the 5B model), umt5_xxl_fp16.safetensors in "
    "models/text_encoders. No toy TI2V files exist yet."
)


def ti2v_5b() -> list[Node]:
    """Image-to-video: the start image as the first latent frame (text-to-video without the conditioning node)."""
    return [
        *_official_loaders("wan2.2_ti2v_5B_fp16.safetensors", "ti2v-5B", "wan2.2_vae.safetensors"),
        Node(6, "LoadImage", {"image": "example.png", "upload": "image"}, title="Start image"),
        Node(8, "WanTunerTI2VImageToVideo", {**TI2V_SIZE, "size_from_image": True},
             {"vae": (3, 0), "start_image": (6, 0)}),
        _sampler(10, (1, 0), (8, 0), steps=50, shift=5.0, guidance_scale=5.0, size=TI2V_SIZE),
        *_decode_save(11, 10, "ti2v_5b", fps=24),
        Node(20, "Note", {"text": NOTE_TI2V}, title="Wan2.2 TI2V-5B"),
    ]


NOTE_STEPCACHE = (
    "Step caching (TeaCache): the sampler skips model passes whose result would barely change and reuses the "
    "previous one. It is calibrated per model: the toy T2V DiT ships its calibration (wan21_toy_t2v_dit."
    "stepcache.json beside it); for other DiTs run python -m wan_core.calibrate_cache --dit <file> once. The "
    "official Wan2.1 T2V 1.3B / 14B and I2V 14B models without a calibration use the published TeaCache "
    "coefficients. cache_threshold 0 takes the mode's default; higher skips more steps at some quality cost."
)


def stepcache() -> list[Node]:
    return [
        *_loaders("t2v", clip=False),
        _sampler(10, (1, 0), None, steps=20, cache_mode="teacache", cache_threshold=0.0),
        *_decode_save(11, 10, "stepcache"),
        _note(20, "wan2.1_t2v_1.3B_fp16.safetensors"),
        Node(21, "Note", {"text": NOTE_STEPCACHE}, title="Step caching"),
    ]


def train_lora() -> list[Node]:
    """Cache a dataset folder, train a LoRA on the toy DiT, then sample with the freshly trained file."""
    loaders = _loaders("t2v", clip=False)
    loaders[3].widgets["prompt"] = "a purple square moving right"
    return [
        *loaders,
        Node(5, "WanTunerCacheDataset", {
            "dataset_path": DATASET_FOLDER, "width": SIZE["width"], "height": SIZE["height"], "frames": SIZE["length"],
            "frame_extraction": "head", "enable_bucket": False, "num_repeats": 1, "batch_size": 1,
            "caption_extension": ".txt"}, {"vae": (3, 0), "t5": (2, 0)}),
        Node(6, "WanTunerTrainLoRA", {
            "output_name": TRAINED_LORA.removesuffix(".safetensors"), "rank": 8, "alpha": 8.0, "learning_rate": 2e-3,
            "steps": 300, "epochs": 0, "optimizer": "AdamW", "timestep_sampling": "shift", "discrete_flow_shift": 3.0,
            "seed": 42, "gradient_checkpointing": True, "save_every_n_steps": 100, "save_format": "musubi",
            "mixed_precision": "auto", "fp8_base": False, "blocks_to_swap": 0, "attention": "sdpa", "boundary": -1.0},
             {"dit": (1, 0), "dataset": (5, 0)}),
        Node(7, "WanTunerLoRALoader", {"lora_name": TRAINED_LORA, "strength": 1.0, "include": "", "exclude": ""},
             {"dit": (1, 0), "lora_name": (6, 0)}, title="LoRA loader (the trained file)"),
        Node(8, "PreviewImage", {}, {"images": (6, 1)}, title="Loss curve"),
        _sampler(10, (7, 0), None), *_decode_save(11, 10, "train_lora"),
        _note(20, "wan2.1_t2v_1.3B_fp16.safetensors"),
        Node(21, "Note", {"text": NOTE_TRAINING.format(folder=f"input/{DATASET_FOLDER}", lora=TRAINED_LORA)},
             title="Training data and settings"),
    ]


WORKFLOWS = {"wantuner_t2v": t2v, "wantuner_i2v": i2v, "wantuner_flf2v": flf2v,
             "wantuner_fun_control": fun_control, "wantuner_lora_regex": lora, "wantuner_fewstep": fewstep,
             "wantuner_train_lora": train_lora, "wantuner_t2v_a14b": t2v_a14b, "wantuner_i2v_a14b": i2v_a14b,
             "wantuner_ti2v_5b": ti2v_5b, "wantuner_stepcache": stepcache}


# ----------------------------------------------------------------------------------------------------------------
# Node description from INPUT_TYPES
# ----------------------------------------------------------------------------------------------------------------


def _is_widget(spec: tuple) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def describe(node_type: str) -> tuple[dict[str, str], list[str], list[tuple[str, str]]]:
    """(socket inputs {name: type}, widget names in order incl. control_after_generate, outputs [(name, type)])."""
    if node_type in NATIVE:
        return NATIVE[node_type]
    if node_type == "Note":
        return {}, ["text"], []
    cls = NODE_CLASS_MAPPINGS[node_type]
    types = cls.INPUT_TYPES()
    sockets, widgets = {}, []
    for group in ("required", "optional"):
        for name, spec in types.get(group, {}).items():
            if _is_widget(spec):
                widgets.append(name)
                if spec[1].get("control_after_generate"):
                    widgets.append("control_after_generate")
            else:
                sockets[name] = spec[0]
    names = getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)
    types = ["COMBO" if isinstance(kind, list) else kind for kind in cls.RETURN_TYPES]  # a list of choices: COMBO
    return sockets, widgets, list(zip(names, types))


def to_api(nodes: list[Node]) -> dict[str, dict]:
    out = {}
    for node in nodes:
        if node.type == "Note":
            continue
        inputs: dict[str, Any] = {k: v for k, v in node.widgets.items() if k != "upload"}
        inputs.update({k: [str(src), slot] for k, (src, slot) in node.links.items()})
        out[str(node.id)] = {"class_type": node.type, "inputs": inputs,
                             "_meta": {"title": node.title or NODE_DISPLAY_NAME_MAPPINGS.get(node.type, node.type)}}
    return out


def _depths(nodes: list[Node]) -> dict[int, int]:
    by_id = {n.id: n for n in nodes}
    depth: dict[int, int] = {}

    def visit(node_id: int) -> int:
        if node_id not in depth:
            sources = [src for src, _ in by_id[node_id].links.values()]
            depth[node_id] = 1 + max((visit(s) for s in sources), default=-1)
        return depth[node_id]

    for n in nodes:
        visit(n.id)
    return depth


def _widget_type(node_type: str, name: str) -> str:
    kind = NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES()
    spec = {**kind.get("required", {}), **kind.get("optional", {})}[name]
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def _ui_inputs(node: Node) -> list[dict[str, Any]]:
    """The node's input slots: its sockets, then the widgets a link feeds (a widget converted to an input)."""
    sockets, widgets, _ = describe(node.type)
    slots: list[dict[str, Any]] = [{"name": n, "type": t} for n, t in sockets.items()]
    slots += [{"name": w, "type": _widget_type(node.type, w), "widget": {"name": w}} for w in widgets
              if w in node.links]
    return slots


def to_ui(nodes: list[Node]) -> dict:
    depth = _depths(nodes)
    rows: dict[int, int] = {}
    links, ui_nodes = [], []
    outputs_links: dict[tuple[int, int], list[int]] = {}
    for node in nodes:
        slots = _ui_inputs(node)
        names = [slot["name"] for slot in slots]
        for name, (src, slot) in node.links.items():
            link_id = len(links) + 1
            index = names.index(name)
            links.append([link_id, src, slot, node.id, index, slots[index]["type"]])
            outputs_links.setdefault((src, slot), []).append(link_id)
    link_of = {(link[3], link[4]): link[0] for link in links}
    for order, node in enumerate(nodes):
        _, widgets, outputs = describe(node.type)
        col = depth[node.id] if node.type != "Note" else 0
        row = rows.get(col, 0)
        rows[col] = row + 1
        ui = {
            "id": node.id, "type": node.type, "pos": [40 + 360 * col, 40 + 260 * row], "size": [320, 200],
            "flags": {}, "order": order, "mode": 0,
            "inputs": [{**slot, "link": link_of.get((node.id, i))} for i, slot in enumerate(_ui_inputs(node))],
            "outputs": [{"name": n, "type": t, "links": outputs_links.get((node.id, i), []), "slot_index": i}
                        for i, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": node.type},
            "widgets_values": [node.widgets.get(w, "fixed") for w in widgets],
        }
        if node.title:
            ui["title"] = node.title
        ui_nodes.append(ui)
    return {"last_node_id": max(n.id for n in nodes), "last_link_id": len(links), "nodes": ui_nodes,
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def render() -> dict[Path, str]:
    files = {}
    for name, build in WORKFLOWS.items():
        nodes = build()
        files[HERE / f"{name}.json"] = json.dumps(to_ui(nodes), indent=2, ensure_ascii=False) + "\n"
        files[HERE / "api" / f"{name}.json"] = json.dumps(to_api(nodes), indent=2, ensure_ascii=False) + "\n"
    return files


def main() -> None:
    for path, text in render().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(path.relative_to(ROOT))  # noqa: T201 (a script)


if __name__ == "__main__":
    main()
