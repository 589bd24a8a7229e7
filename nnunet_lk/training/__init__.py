"""nnU-Net trainers: the seam in base.py, the thin per-backbone classes in trainers.py."""
