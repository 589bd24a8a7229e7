"""torch.compile of every backbone's forward on CPU (issue 7; nnU-Net compiles by default on CUDA).

Slow (``-m slow``): inductor compiles C++ kernels. One tiny 2D network per backbone at one size: DLKUNet-S in
CI, every other backbone with ``-m full`` (LGMSNet, MS-LKSeg and LM-Net each take over two minutes of compilation
on 2 cores),
compiled once in train mode (the forward nnU-Net's trainer compiles; eval mode would be a second
compilation) and compared with eager (atol 5e-4: inductor's vectorised reductions, train-mode batch norm
above all, sum in another order than eager's, and the order follows the CPU's vector width; an AVX2 CPU
gave 1.05e-4 on one logit). A backbone that cannot compile fails with the
compiler's message."""
import time

import pytest
import torch

from nnunet_lk.networks import build_backbone, list_backbones
from tests.helpers.tiny import TINY_OPTIONS

SIZE = (32, 32)


# CI compiles one family (about 40 s on 2 cores); LGMSNet and MS-LKSeg took over 2 minutes each on an AVX2 CPU
# beside a training, more than CI's 40-minute budget leaves: -m full adds them and every other backbone.
FAMILY_REPRESENTATIVES = {"dlkunet_s"}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in FAMILY_REPRESENTATIVES else [pytest.mark.full])
                                  for n in list_backbones()])
def test_backbone_compiles_and_matches_eager(name):
    import torch._dynamo
    import torch._inductor.config as inductor_config
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = build_backbone(name, dim=2, input_channels=1, num_classes=3, deep_supervision=True,
                         **TINY_OPTIONS[name]).train()
    x = torch.randn(2, 1, *SIZE, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    compiled = torch.compile(net)  # the default (inductor) backend, as nnU-Net uses it
    torch.manual_seed(2)  # dropout (LM-Net) draws the same masks in both runs
    with torch.no_grad():
        eager = net(x)
    torch.manual_seed(2)
    # fallback_random: compiled dropout draws eager's masks. A config patch, not monkeypatch: torch's
    # config module loses the attribute when monkeypatch undoes it.
    with torch.no_grad(), inductor_config.patch(fallback_random=True):
        out = compiled(x)
    assert len(out) == len(eager)
    for e, c in zip(eager, out):
        assert e.shape == c.shape
        torch.testing.assert_close(c, e, atol=5e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    print(f"{name}: compiled and checked in {time.perf_counter() - start:.1f} s")
