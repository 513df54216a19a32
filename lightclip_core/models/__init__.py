from lightclip_core.models.clip import CLIP, build_model, model_summary

__all__ = ["CLIP", "build_model", "model_summary"]
