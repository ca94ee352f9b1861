"""inference/sampler.py pieces that the end-to-end interpolate tests do not reach on a CPU."""

from __future__ import annotations

import pytest
import torch


def test_host_resident_weights_visit_a_device_and_come_back_without_a_copy():
    from torch import nn

    from inference.sampler import HostResident

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    x = torch.randn(2, 4)
    expected = net(x)

    def tensors():
        return [*net.parameters(), *net.buffers()]

    host = tensors()
    resident = HostResident([net], pin=False)
    with resident.visit(torch.device("meta")):
        assert len(tensors()) == len(host) == 7 and all(t.device.type == "meta" for t in tensors())
        assert net(x.to("meta")).device.type == "meta"
    assert all(a is b for a, b in zip(tensors(), host, strict=True))  # the host tensors: nothing copied back
    assert torch.equal(net(x), expected)
    with pytest.raises(RuntimeError, match="encoder"), resident.visit(torch.device("meta")):
        raise RuntimeError("an encoder failed")
    assert all(a is b for a, b in zip(tensors(), host, strict=True))  # back on the host after an error too
