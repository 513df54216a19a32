from lightclip_core.losses.contrastive import ContrastiveObjective, clip_logits, contrastive_loss

__all__ = ["ContrastiveObjective", "clip_logits", "contrastive_loss"]
