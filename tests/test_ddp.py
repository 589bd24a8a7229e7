"""Every backbone under torch DDP (issue 7): gloo on CPU, 2 processes, as nnU-Net's ``-num_gpus 2`` wraps
the network (``DDP(network)``, no find_unused_parameters, deep supervision on).

nnU-Net also converts BatchNorm to SyncBatchNorm. SyncBatchNorm only synchronises on GPU/XPU inputs:
in training mode on CPU with a process group it raises ``SyncBatchNorm expected input tensor to be on
GPU``. So here the conversion itself is checked (every BN replaced, state dict unchanged, eval output
unchanged) and the DDP training steps run with plain BatchNorm; the synchronised statistics path is
PyTorch's own and only runs on CUDA."""
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from nnunet_lk.networks import build_backbone, list_backbones
from tests.helpers.tiny import TINY_OPTIONS  # this test is about synchronisation, not capacity

SIZE = (32, 32)
WORLD = 2


def _net(name, deep_supervision=True):
    torch.manual_seed(0)
    return build_backbone(name, dim=2, input_channels=1, num_classes=3, deep_supervision=deep_supervision,
                          **TINY_OPTIONS[name])


def _loss(outputs):
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return sum((o.float() ** 2).mean() * (0.5 ** i) for i, o in enumerate(outputs))


def _gather(t):
    parts = [torch.zeros_like(t) for _ in range(WORLD)]
    dist.all_gather(parts, t.contiguous())
    return parts


def _check_backbone(name, rank):
    """Returns a list of problems seen on this rank (empty = fine)."""
    problems = []
    # SyncBatchNorm conversion as nnU-Net does it: every BN replaced, state dict keys unchanged.
    plain = _net(name).eval()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(_net(name)).eval()
    if list(plain.state_dict()) != list(synced.state_dict()):
        problems.append("SyncBatchNorm conversion changed the state dict keys")
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
           for m in synced.modules()):
        problems.append("a BatchNorm was not converted to SyncBatchNorm")
    probe = torch.randn(1, 1, *SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if not torch.allclose(plain(probe)[0], synced(probe)[0], atol=1e-6):
            problems.append("SyncBatchNorm (eval) output differs from BatchNorm")

    net = _net(name).train()
    local = _net(name).train()  # the same weights, no DDP: the reference for averaged gradients
    ddp = nn.parallel.DistributedDataParallel(net)
    # 1) same input on both ranks -> same output on both ranks
    same = torch.randn(2, 1, *SIZE, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)  # dropout (LM-Net's MLP) draws the same masks on both ranks
    out = ddp(same)[0].detach()
    a, b = _gather(out)
    if not torch.equal(a, b):
        problems.append(f"outputs differ across ranks for the same input (max {float((a - b).abs().max()):.3e})")
    ddp.zero_grad(set_to_none=True)  # that forward's graph is dropped unused
    # 2) different inputs -> after backward, gradients equal on both ranks and equal to the mean of the
    #    local (non-DDP) gradients; twice, so that a parameter DDP never sees used fails the 2nd step.
    for step in range(2):
        x = torch.randn(2, 1, *SIZE, generator=torch.Generator().manual_seed(10 * step + rank))
        ddp.zero_grad(set_to_none=True)
        torch.manual_seed(100 + step)  # same dropout masks in the DDP and the local forward
        _loss(ddp(x)).backward()
        local.zero_grad(set_to_none=True)
        local.load_state_dict(net.state_dict())
        torch.manual_seed(100 + step)
        _loss(local(x)).backward()
        for (pname, p), (_, q) in zip(net.named_parameters(), local.named_parameters()):
            if p.grad is None:
                problems.append(f"step {step}: {pname} got no gradient")
                break
            g0, g1 = _gather(p.grad)
            expected = q.grad.clone() if q.grad is not None else torch.zeros_like(p)
            dist.all_reduce(expected)
            expected /= WORLD
            if not torch.equal(g0, g1):
                problems.append(f"step {step}: gradient of {pname} differs across ranks")
                break
            if not torch.allclose(p.grad, expected, rtol=1e-4, atol=1e-6):
                problems.append(f"step {step}: gradient of {pname} is not the mean of the ranks' gradients "
                                f"(max {float((p.grad - expected).abs().max()):.3e})")
                break
        with torch.no_grad():  # keep the ranks' weights in lockstep as an optimizer step would
            for p in net.parameters():
                p -= 0.01 * p.grad
    return problems


def _worker(rank, init_file, names, result_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    report = []
    try:
        for name in names:
            try:
                problems = _check_backbone(name, rank)
            except Exception:
                problems = ["raised:\n" + traceback.format_exc(limit=4)]
            report.append(f"{name}: " + ("ok" if not problems else "; ".join(problems)))
    finally:
        with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(report))
        dist.destroy_process_group()


@pytest.mark.timeout(600)
def test_every_backbone_under_ddp_gloo(tmp_path):
    names = list_backbones()
    mp.spawn(_worker, args=(str(tmp_path / "init"), names, str(tmp_path)), nprocs=WORLD, join=True)
    reports = [(tmp_path / f"rank{r}.txt").read_text().splitlines() for r in range(WORLD)]
    failures = [line for report in reports for line in report if not line.endswith(": ok")]
    assert len(reports[0]) == len(names) and not failures, "\n".join(failures)


def test_syncbatchnorm_cannot_train_on_cpu_with_a_process_group(tmp_path):
    """Why the DDP test keeps plain BatchNorm: fails the day PyTorch supports CPU SyncBatchNorm."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        bn = nn.SyncBatchNorm(2).train()
        with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
            bn(torch.randn(2, 2, 4, 4))
    finally:
        dist.destroy_process_group()
