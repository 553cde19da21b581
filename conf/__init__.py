"""Hydra config groups, installed as the package vlm_train.conf so a non-editable install finds them."""
