from lightclip_core.losses.base import Objective, StepContext
from lightclip_core.losses.instance import clip_logits, contrastive_loss

__all__ = ["Objective", "StepContext", "clip_logits", "contrastive_loss"]
