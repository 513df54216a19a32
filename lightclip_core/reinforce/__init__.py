"""Dataset reinforcement (MobileCLIP): the teacher ensemble, the CoCa captioner, the trained default teacher and the
stage that stores augmentations, synthetic captions and teacher embeddings next to the shards."""
