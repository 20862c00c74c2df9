from vlmkit.models.vision.encoder import VisionEncoder, vision_hf_config

__all__ = ["VisionEncoder", "vision_hf_config"]
