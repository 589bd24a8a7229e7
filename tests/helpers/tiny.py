"""Smallest per-backbone options each backbone's blocks accept, for tests that build every backbone on a CPU."""
TINY_OPTIONS = {"dlkunet_s": dict(width=8), "dlkunet_m": dict(width=8), "dlkunet_l": dict(width=8),
                "lgmsnet": dict(widths=[8] * 6), "lmnet": dict(width=4, heads=4, gft_heads=4),
                "mslkseg": dict(width=4, dyconv_kernels=2)}
