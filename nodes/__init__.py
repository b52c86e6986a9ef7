"""ComfyUI V1 nodes over `wan_core`. Node ids all start with `WanTuner`."""

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
