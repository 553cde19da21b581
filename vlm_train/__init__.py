"""vlm_train: packed-sequence pretraining of vision-language models."""
