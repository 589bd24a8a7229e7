"""The U skeleton's float32 switch (``LKUNet.full_precision``), for every backbone."""
import pytest
import torch

from nnunet_lk.networks import build_backbone, list_backbones
from nnunet_lk.networks.unet import FULL_PRECISION_KEY
from tests.helpers.tiny import TINY_OPTIONS


def _tiny(name, deep_supervision=False):
    torch.manual_seed(0)
    return build_backbone(name, dim=2, input_channels=1, num_classes=3, deep_supervision=deep_supervision,
                          **TINY_OPTIONS[name]).eval()


@pytest.mark.parametrize("name", list_backbones())
def test_float16_autocast_and_the_float32_switch(name):
    # CUDA training runs in fp16 autocast: at initialisation every backbone stays finite and near float32
    # there. A trained network that overflows is switched to float32 by the trainer (full_precision).
    net = _tiny(name)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        reference = net(x)
        with torch.autocast("cpu", dtype=torch.float16):
            half = net(x)
            net.full_precision = True
            forced = net(x)
    assert half.dtype == torch.float16 and torch.isfinite(half).all()  # autocast really reaches the blocks
    torch.testing.assert_close(half.float(), reference, atol=5e-3, rtol=5e-2)
    assert forced.dtype == torch.float32  # ...and the switch takes them out of it
    torch.testing.assert_close(forced, reference)


def test_full_precision_travels_in_the_state_dict_and_old_checkpoints_still_load():
    trained = _tiny("lgmsnet", deep_supervision=True)
    old_checkpoint = trained.state_dict()
    assert FULL_PRECISION_KEY not in old_checkpoint  # unchanged format while the switch is off
    trained.full_precision = True
    checkpoint = trained.state_dict()
    assert checkpoint[FULL_PRECISION_KEY]

    inference = _tiny("lgmsnet")  # nnUNetv2_predict: built afresh, deep supervision off, strict load
    inference.load_state_dict(checkpoint, strict=True)
    assert inference.full_precision and FULL_PRECISION_KEY in checkpoint  # the caller's dict is untouched
    inference.load_state_dict(old_checkpoint, strict=True)
    assert not inference.full_precision

