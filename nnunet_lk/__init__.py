"""nnunet-lk: lightweight large-kernel segmentation backbones as nnU-Net v2 trainers."""
__version__ = "0.1.0"
