"""MC dropout on plain torch modules: what is switched on, what stays, and that switching off restores."""

import io
import warnings

import pytest
import torch
from torch import nn

from bioadapt.adapters.dropout import CommonMasks, HeadSplit, MCDropout, stacked_passes
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
            # the layers stay in eval mode: their hooks apply the round's masks with the layers' own p
            assert not any(m.training for m in net.modules())
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


def test_channel_masks_zero_whole_feature_channels_on_the_right_axis():
    masks = CommonMasks(seed=3, p=0.5)
    for shape, axis in [((3, 16, 50), 1), ((3, 16, 20, 20), 1), ((3, 16, 6, 6, 6), 1), ((3, 7, 9, 16), -1)]:
        y = masks.apply(torch.ones(shape), (0, 0), [0, 1, 1], feature_axis=axis)
        per_channel = y.movedim(axis, 1).flatten(2)
        # whole channels are zeroed or scaled together, as nn.Dropout1d/2d/3d do
        assert torch.equal(per_channel.min(-1).values, per_channel.max(-1).values)
        assert set(per_channel.unique().tolist()) <= {0.0, 2.0}
        assert torch.equal(y[1], y[2]) and not torch.equal(y[0], y[1])  # rows of one pass share the mask
    y = CommonMasks(seed=3, p=0.5, kind="element").apply(torch.ones(3, 16, 20, 20), (0, 0), [0, 0, 0])
    assert not torch.equal(y.flatten(2).min(-1).values, y.flatten(2).max(-1).values)
    assert torch.equal(y[0], y[2])


def test_element_masks_kept_for_the_round_equal_fresh_ones_and_stay_within_the_budget():
    x = torch.ones(2, 8, 16, 16)  # a row of 2,048 elements: one pass's mask
    kept = CommonMasks(seed=5, p=0.3, kind="element", cache_bytes=3 * 2048)
    first = kept.apply(x, (1, 0), [0, 1])
    again = kept.apply(x, (1, 0), [0, 1])  # the next patch of the round: served from the cache
    fresh = CommonMasks(seed=5, p=0.3, kind="element", cache_bytes=0).apply(x, (1, 0), [0, 1])
    assert torch.equal(first, again) and torch.equal(first, fresh)
    assert kept.cached_bytes == 2 * 2048
    beyond = kept.apply(x, (2, 0), [0, 1])  # two more masks: one fits the budget, the other is drawn each time
    assert kept.cached_bytes == 3 * 2048
    assert torch.equal(beyond, CommonMasks(seed=5, p=0.3, kind="element", cache_bytes=0).apply(x, (2, 0), [0, 1]))


def test_masks_depend_on_seed_layer_and_pass_only():
    x = torch.ones(4, 32, 8, 8)
    a = CommonMasks(seed=1, p=0.3).apply(x, (2, 0), [0, 1, 2, 3])
    b = CommonMasks(seed=1, p=0.3).apply(x[:2], (2, 0), [2, 3])  # another batch, same passes
    assert torch.equal(a[2:], b)
    assert not torch.equal(a, CommonMasks(seed=2, p=0.3).apply(x, (2, 0), [0, 1, 2, 3]))
    assert not torch.equal(a, CommonMasks(seed=1, p=0.3).apply(x, (3, 0), [0, 1, 2, 3]))


def test_every_patch_sees_the_same_masks_whatever_the_batching():
    torch.manual_seed(0)
    net = UNet(dims=2, features=4, batchnorm=True).eval()
    mc = MCDropout(net, p=0.2)
    patches = torch.randn(5, 1, 32, 32)
    with torch.no_grad():
        together = stacked_passes(mc, net, patches, passes=6, chunk_rows=30, seed=11)
        chunked = stacked_passes(mc, net, patches, passes=6, chunk_rows=4, seed=11)
        alone = torch.cat([stacked_passes(mc, net, patches[i:i + 1], passes=6, chunk_rows=1, seed=11)
                           for i in range(5)])  # patch-major
        other_round = stacked_passes(mc, net, patches, passes=6, chunk_rows=30, seed=12)
    torch.testing.assert_close(chunked, together, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone.reshape(5, 6, *alone.shape[1:]).transpose(0, 1),
                               together.reshape(6, 5, *together.shape[1:]), atol=1e-5, rtol=0)
    passes = together.reshape(6, 5, -1)
    assert (passes[0] - passes[1]).abs().max() > 1e-3  # passes differ
    assert (together - other_round).abs().max() > 1e-3  # rounds differ
    # the same image twice in one batch gets identical samples: masks are shared across rows of a pass
    twice = torch.cat([patches[:1], patches[:1]])
    with torch.no_grad():
        out = stacked_passes(mc, net, twice, passes=3, chunk_rows=6, seed=11).reshape(3, 2, -1)
    torch.testing.assert_close(out[:, 0], out[:, 1], atol=1e-6, rtol=0)


def test_existing_dropout_layers_use_common_masks_too():
    torch.manual_seed(0)
    net = UNet(dims=2, features=4, dropout=0.3).eval()
    mc = MCDropout(net)
    assert mc.common_masks
    patches = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        together = stacked_passes(mc, net, patches, passes=4, chunk_rows=12, seed=5)
        chunked = stacked_passes(mc, net, patches, passes=4, chunk_rows=5, seed=5)
    torch.testing.assert_close(chunked, together, atol=1e-5, rtol=0)


def test_token_mlp_activations_drop_features_not_tokens():
    class TokenMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin1, self.act, self.lin2 = nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)

        def forward(self, x):  # (B, H, W, features), as in a vision transformer's blocks
            return self.lin2(self.act(self.lin1(x)))

    net = TokenMLP().eval()
    mc = MCDropout(net, p=0.5)
    seen = []
    net.lin2.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0]))
    with torch.no_grad(), mc.enabled(seed=0):
        net(torch.randn(1, 6, 6, 8))
    dropped = (seen[0] == 0).all(dim=(0, 1, 2))  # a feature zeroed for every token
    assert dropped.any() and ((seen[0] == 0).any(dim=(0, 1, 2)) == dropped).all()


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
            assert torch.allclose(head.run(features, CommonMasks(0, 0.0), 0), net(x), atol=1e-6)
            masks = CommonMasks(0, 0.5, "element")
            assert not torch.equal(head.run(features, masks, 0), head.run(features, masks, 1))
            assert torch.equal(head.run(features, masks, 1), head.run(features, CommonMasks(0, 0.5, "element"), 1))
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


class InplaceUNet(nn.Module):
    """Two levels, a skip connection, one max-pool module called twice, in-place ReLUs after two convolutions per
    stage (as unet2d_nuclei_broad's stages are built)."""

    def __init__(self):
        super().__init__()
        stage = lambda a, b: nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.Conv2d(b, b, 3, padding=1),  # noqa: E731
                                           nn.ReLU(inplace=True))
        self.enc, self.mid, self.deep = stage(1, 4), stage(4, 8), stage(8, 8)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=4)
        self.dec = stage(12, 4)
        self.out = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        skip = self.enc(x)
        deep = self.deep(self.pool(self.mid(self.pool(skip))))
        return self.out(self.dec(torch.cat([skip, self.up(deep)], 1)))


def _masked_at(mc, net, x, passes, seed, only):
    """The full network with masks at the (layer, call) pairs ``only``: what partial passes must equal."""
    with mc.enabled(seed, only=only), mc.rows([row // len(x) for row in range(passes * len(x))]):
        return net(x.repeat(passes, 1, 1, 1))


@pytest.mark.parametrize("net_class", [UNet, InplaceUNet])
def test_partial_passes_are_the_network_with_masks_at_its_last_sites_only(net_class):
    """The split replays every tensor the stochastic part reads (skip connections, a module called twice,
    outputs an in-place ReLU changes), so partial passes equal whole forwards with the early masks left out."""
    from bioadapt.adapters.partial import PartialSplit, partial_passes

    torch.manual_seed(0)
    net = net_class().eval()
    mc = MCDropout(net, p=0.3, kind="element")
    with torch.no_grad():
        for patches in (torch.randn(1, 1, 16, 16), torch.randn(3, 1, 16, 16)):
            for depth in (1, 2, mc.patched_layers):
                split = PartialSplit(mc, net, patches[:1], depth)
                assert split.depth == depth and len(split.stochastic) == depth
                expected = _masked_at(mc, net, patches, 4, 5, split.stochastic)
                for chunk_rows in (1, 5, 12):  # served as views (one patch) or copies, in any batching
                    torch.testing.assert_close(partial_passes(split, mc, patches, 4, chunk_rows, seed=5), expected,
                                               atol=1e-6, rtol=0)
            whole = PartialSplit(mc, net, patches[:1], 100)  # deeper than the network: the full scope
            torch.testing.assert_close(partial_passes(whole, mc, patches, 3, 4, seed=5),
                                       stacked_passes(mc, net, patches, 3, 4, seed=5), atol=1e-6, rtol=0)
    assert not any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in net.modules())


class CountingConv(nn.Conv2d):
    """A convolution that counts the rows it computes (hooks would count replayed calls too)."""

    rows = 0

    def forward(self, x):
        self.rows += len(x)
        return super().forward(x)


def test_partial_passes_compute_the_early_network_once_per_patch():
    from bioadapt.adapters.partial import PartialSplit, partial_passes

    net = InplaceUNet().eval()
    net.enc[0], net.dec[1] = CountingConv(1, 4, 3, padding=1), CountingConv(4, 4, 3, padding=1)
    mc = MCDropout(net, p=0.2)
    patches = torch.randn(2, 1, 16, 16)
    split = PartialSplit(mc, net, patches[:1], 1)  # the last ReLU is the only stochastic site
    net.enc[0].rows = net.dec[1].rows = 0
    with torch.no_grad():
        samples = partial_passes(split, mc, patches, 8, 4, seed=0)
    assert net.enc[0].rows == net.dec[1].rows == 2  # once per patch, not in the 8 passes
    assert (samples[0] - samples[2]).abs().max() > 1e-4  # pass 0 and pass 1 of the first patch differ


def test_partial_split_refuses_what_it_cannot_replay():
    from bioadapt.adapters.partial import PartialSplit, partial_passes

    class ByValue(nn.Module):  # calls another module when the input is bright: no static split
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act, self.out = nn.Conv2d(1, 2, 1), nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Conv2d(2, 1, 1)

        def forward(self, x):
            return self.out(self.act(self.a(x) if x.mean() < 0 else self.b(x)))

    net = ByValue().eval()
    mc = MCDropout(net, p=0.2)
    split = PartialSplit(mc, net, -torch.ones(1, 1, 4, 4), 1)
    with pytest.raises(BioadaptError, match="ran other modules"), torch.no_grad():
        partial_passes(split, mc, torch.ones(1, 1, 4, 4), 2, 2, seed=0)
    with pytest.raises(BioadaptError, match="mc_depth must be >= 1"):
        PartialSplit(mc, net, torch.ones(1, 1, 4, 4), 0)
    with pytest.raises(BioadaptError, match="TorchScript"):
        PartialSplit(MCDropout(torch.jit.script(UNet(dims=2, features=4, dropout=0.3).eval())), net,
                     torch.ones(1, 1, 4, 4), 1)
