"""Dimension-agnostic building blocks; every block takes ``conv_op`` (nn.Conv2d / nn.Conv3d)."""
