"""The folder nnUNet_extTrainer points at (installed as nnunet_lk_ext)."""
