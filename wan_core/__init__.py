"""wan_core: a standalone PyTorch implementation of the Wan2.1 model stack (no ComfyUI imports)."""
