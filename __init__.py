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

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./web/js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
