"""ComfyUI-WanTuner: Wan2.1 nodes for ComfyUI, backed by the standalone `wan_core` library.

ComfyUI imports this folder as a package. The node classes are plain V1 classes that work without ComfyUI;
everything ComfyUI-specific lives in `nodes/comfy_adapter.py`.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
if _ROOT not in sys.path:
    # `wan_core` and `training` are imported absolutely by the nodes; append (never prepend) so that
    # ComfyUI's own top-level modules (`nodes`, `server`, ...) always win.
    sys.path.append(_ROOT)

WEB_DIRECTORY = "./web/js"

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
# Otherwise this file runs as a plain module named `__init__`: pytest does that for the checkout's root when the
# folder's name is not a Python identifier (a clone named ComfyUI-WanTuner), and there is no package to import from.
