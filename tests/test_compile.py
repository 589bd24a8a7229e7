"""torch.compile of every backbone's forward on CPU (issue 7; nnU-Net compiles by default on CUDA).

Slow (``-m slow``): inductor compiles C++ kernels, ~1-3 min per backbone on a loaded 2-core machine. One
tiny 2D network per backbone at one size, compiled once in train mode (the forward nnU-Net's trainer
compiles; eval mode would be a second compilation) and compared with eager (atol 1e-4). A backbone
that cannot compile fails with the compiler's message."""
import time

import pytest
import torch

from nnunet_lk.networks import build_backbone, list_backbones

TINY = {"dlkunet_s": dict(width=8), "dlkunet_m": dict(width=8), "dlkunet_l": dict(width=8),
        "lgmsnet": dict(widths=[8] * 6), "lmnet": dict(width=4, heads=4, gft_heads=4),
        "mslkseg": dict(width=4, dyconv_kernels=2)}
SIZE = (32, 32)


@pytest.mark.slow
@pytest.mark.full  # about 15 min on 2 cores
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list_backbones())
def test_backbone_compiles_and_matches_eager(name, monkeypatch):
    import torch._dynamo
    import torch._inductor.config as inductor_config
    torch._dynamo.reset()
    monkeypatch.setattr(inductor_config, "fallback_random", True)  # compiled dropout = eager's masks (LM-Net)
    torch.manual_seed(0)
    net = build_backbone(name, dim=2, input_channels=1, num_classes=3, deep_supervision=True,
                         **TINY.get(name, {}))
    x = torch.randn(2, 1, *SIZE, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    compiled = torch.compile(net)  # the default (inductor) backend, as nnU-Net uses it
    for mode in ("train",):
        getattr(net, mode)()
        torch.manual_seed(2)  # dropout (LM-Net) draws the same masks in both runs
        with torch.no_grad():
            eager = net(x)
        torch.manual_seed(2)
        with torch.no_grad():
            out = compiled(x)
        assert len(out) == len(eager)
        for e, c in zip(eager, out):
            assert e.shape == c.shape
            torch.testing.assert_close(c, e, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name} ({mode}): {m}")
    print(f"{name}: compiled and checked in {time.perf_counter() - start:.1f} s")
