"""LoRA: the file formats (musubi, ComfyUI, diffusers/PEFT, LyCORIS), applying them to a model (merged or unmerged)
and the trainable network."""
