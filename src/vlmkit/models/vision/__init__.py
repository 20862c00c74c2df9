from vlmkit.models.vision.encoder import VisionEncoder, vision_hf_config
from vlmkit.models.vision.fused import FusedVisionEncoder
from vlmkit.models.vision.library import LibraryVisionEncoder
from vlmkit.models.vision.towers import (
    build_vision_encoder,
    load_vision,
    vision_config_from_dirs,
    vision_sources,
)

__all__ = [
    "FusedVisionEncoder",
    "LibraryVisionEncoder",
    "VisionEncoder",
    "build_vision_encoder",
    "load_vision",
    "vision_config_from_dirs",
    "vision_hf_config",
    "vision_sources",
]
