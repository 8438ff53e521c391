"""MC dropout on plain torch modules: what is switched on, what stays, and that switching off restores."""

import io
import warnings

import pytest
import torch
from torch import nn

from bioadapt.adapters.dropout import HeadSplit, MCDropout, functional_dropout
from bioadapt.adapters.unet import UNet
from bioadapt.errors import BioadaptError


class FunctionalNet(nn.Module):
    """Activations called as functions inside forward: nothing a hook can attach to."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.out = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        return self.out(torch.relu(self.conv(x)))


class Nested(nn.Module):
    """An activation module shared by two layers and living outside any nn.Sequential."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv3d(1, 6, 3, padding=1)
        self.b = nn.Conv3d(6, 6, 3, padding=1)
        self.bn = nn.BatchNorm3d(6)
        self.act = nn.LeakyReLU()
        self.head = nn.Conv3d(6, 2, 1)
        self.final = nn.Sigmoid()

    def forward(self, x):
        return self.final(self.head(self.act(self.bn(self.b(self.act(self.a(x)))))))


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_hooks_keep_state_dict_keys_and_restore_the_deterministic_output():
    torch.manual_seed(0)
    net = UNet(dims=2, features=4, batchnorm=True).eval()
    before, keys = _state(net), list(net.state_dict())
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        reference = net(x)
    mc = MCDropout(net, p=0.2)
    assert mc.strategy == "hooks" and mc.patched_layers == sum(isinstance(m, nn.ReLU) for m in net.modules())
    with torch.no_grad(), mc.enabled():
        a, b = net(x), net(x)
        assert all(not m.training for m in net.modules())  # batch-norm and everything else stay in eval
    assert (a - b).abs().max() > 1e-3, "MC passes should differ"
    assert list(net.state_dict()) == keys and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(m._forward_hooks for m in net.modules())
    with torch.no_grad():
        assert torch.equal(net(x), reference)


def test_existing_dropout_layers_are_switched_on_and_back_off():
    net = UNet(dims=2, features=4, dropout=0.3).eval()
    mc = MCDropout(net)
    assert mc.strategy == "existing" and mc.patched_layers == 5  # 3 down + 2 up blocks
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        reference = net(x)
        with mc.enabled():
            assert all(m.training for m in net.modules() if isinstance(m, nn.Dropout2d))
            assert not net.training
            noisy = net(x)
        assert (noisy - reference).abs().max() > 1e-4
        assert torch.equal(net(x), reference)


def test_mean_of_passes_approaches_the_deterministic_output_as_p_goes_to_zero():
    torch.manual_seed(1)
    net = UNet(dims=2, features=4).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        reference = torch.sigmoid(net(x))
        errors = []
        for p in (0.3, 0.05, 0.001):
            mc = MCDropout(net, p=p)
            with mc.enabled():
                mean = torch.stack([torch.sigmoid(net(x)) for _ in range(32)]).mean(0)
            errors.append(float((mean - reference).abs().mean()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3, errors


def test_shared_activation_outside_sequential_is_hooked_and_output_sigmoid_is_not():
    net = Nested().eval()
    mc = MCDropout(net, p=0.5)
    assert mc.patched_layers == 1  # the one LeakyReLU, called twice; never the final Sigmoid
    calls = []
    net.act.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad(), mc.enabled():
        out = net(x)
    assert len(calls) == 2 and 0 <= float(out.min()) and float(out.max()) <= 1


def test_channel_dropout_matches_the_dimensionality():
    torch.manual_seed(0)
    for shape in [(3, 16, 50), (3, 16, 20, 20), (3, 16, 6, 6, 6)]:
        y = functional_dropout(torch.ones(shape), 0.5)
        per_channel = y.flatten(2)
        # whole channels are zeroed or scaled together, as nn.Dropout1d/2d/3d do
        assert torch.equal(per_channel.min(-1).values, per_channel.max(-1).values)
        assert set(per_channel.unique().tolist()) <= {0.0, 2.0}
    y = functional_dropout(torch.ones(3, 16, 20, 20), 0.5, kind="element")
    assert not torch.equal(y.flatten(2).min(-1).values, y.flatten(2).max(-1).values)


def test_nothing_to_patch_warns():
    with pytest.warns(UserWarning, match="cannot make FunctionalNet stochastic"):
        mc = MCDropout(FunctionalNet())
    assert mc.strategy == "none"


def test_torchscript_dropout_is_switched_on_but_hooks_are_not_possible():
    net = torch.jit.script(UNet(dims=2, features=4, dropout=0.3).eval())
    buffer = io.BytesIO()
    torch.jit.save(net, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer).eval()
    mc = MCDropout(loaded)
    assert mc.strategy == "existing"
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        reference = loaded(x)
        with mc.enabled():
            assert (loaded(x) - reference).abs().max() > 1e-4
        assert torch.equal(loaded(x), reference)
    plain = torch.jit.script(UNet(dims=2, features=4).eval())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert MCDropout(plain).strategy == "none"
    assert any("TorchScript" in str(w.message) for w in caught)
    with pytest.raises(BioadaptError, match="TorchScript"):
        HeadSplit(plain, x)


def test_head_split_runs_features_once_and_reproduces_the_network():
    torch.manual_seed(0)
    for net, x in [(UNet(dims=2, features=4).eval(), torch.randn(2, 1, 16, 16)),
                   (Nested().eval(), torch.randn(2, 1, 8, 8, 8))]:
        head = HeadSplit(net, x[:1])
        with torch.no_grad():
            features = head.features(net, x)
            assert torch.allclose(head.run(features, 0.0, "channel"), net(x), atol=1e-6)
            assert not torch.equal(head.run(features, 0.5, "element"), head.run(features, 0.5, "element"))
    assert isinstance(HeadSplit(Nested().eval(), torch.randn(1, 1, 8, 8, 8)).head, nn.Conv3d)


def test_head_split_refuses_networks_that_compute_after_the_last_layer():
    class AfterHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1)

        def forward(self, x):
            return self.conv(x) * 2 + x

    with pytest.raises(BioadaptError, match="mc_scope='full'"):
        HeadSplit(AfterHead(), torch.randn(1, 1, 4, 4))


def test_bad_p():
    with pytest.raises(BioadaptError, match="dropout_p"):
        MCDropout(UNet(), p=1.0)
