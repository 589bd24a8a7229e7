"""Plans presets for `nnunet-lk plans --preset NAME` (installed as nnunet_lk.presets)."""
