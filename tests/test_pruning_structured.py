"""Structural pruning on Torch-Pruning: counts by hand, bit-identity, output layers, GroupNorm, attention, save/load."""

import copy
import warnings

import pytest
import timm
import torch
from torch import nn

from pruning import (
    MatmulPruner,
    StructuredPruner,
    accumulate_gradients,
    count_macs_params,
    find_output_layers,
    load_pruned,
    measure_latency,
    plan_for_macs,
    prune_structured,
    ratio_for_macs,
    save_pruned,
)
from pruning.structured import find_unwrapped_parameters, regroup_count


def tiny_classifier(c1: int = 8, c2: int = 8) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c2, 10),
    )


def hand_count(c1: int, c2: int, hw: int = 64) -> tuple[int, int]:
    """(MACs, params) of tiny_classifier on one 8×8 image, as Torch-Pruning's counter defines them:
    conv k²·Cin·Cout·HW + bias Cout·HW, ReLU and pooling one op per input element, linear in·out + out."""
    params = (9 * c1 + c1) + (9 * c1 * c2 + c2) + (10 * c2 + 10)
    macs = (9 * c1 * hw + c1 * hw) + c1 * hw + (9 * c1 * c2 * hw + c2 * hw) + c2 * hw + c2 * hw + (10 * c2 + 10)
    return macs, params


class GNNet(nn.Module):
    """A UNet-like block stack with GroupNorm, SiLU, a residual and an output conv; called as model(x, t)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Conv2d(3, 32, 3, padding=1)
        self.temb = nn.Linear(1, 32)
        self.norm1 = nn.GroupNorm(8, 32)
        self.conv1 = nn.Conv2d(32, 32, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, 32)
        self.out = nn.Conv2d(32, 3, 3, padding=1)

    def forward(self, x, t):
        h = self.inp(x) + self.temb(t[:, None])[:, :, None, None]
        h = h + self.conv1(nn.functional.silu(self.norm1(h)))
        return self.out(nn.functional.silu(self.norm2(h)))


class NIN(nn.Module):
    """x @ W + b on channels-last tokens, W stored (in, out), as in DDPM++ attention."""

    def __init__(self, ch: int):
        super().__init__()
        self.W = nn.Parameter(torch.randn(ch, ch) / ch**0.5)
        self.b = nn.Parameter(torch.zeros(ch))

    def forward(self, tokens):
        return tokens @ self.W + self.b


class SkipAttnNet(nn.Module):
    """UNet pattern: a skip concatenated into a GroupNorm, GroupNorm-ed single-head attention made of NIN layers."""

    def __init__(self, skip: int = 16):
        super().__init__()
        self.inp = nn.Conv2d(3, skip, 3, padding=1)
        self.down = nn.Conv2d(skip, 16, 3, padding=1)
        self.attn_norm = nn.GroupNorm(4, 16)
        self.q, self.k, self.v, self.o = NIN(16), NIN(16), NIN(16), NIN(16)
        self.up_norm = nn.GroupNorm(8, 16 + skip)
        self.up = nn.Conv2d(16 + skip, 16, 3, padding=1)
        self.out_norm = nn.GroupNorm(4, 16)
        self.out = nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x):
        skip = self.inp(x)
        h = self.down(skip)
        b, c, hh, ww = h.shape
        tokens = self.attn_norm(h).flatten(2).transpose(1, 2)
        attended = nn.functional.scaled_dot_product_attention(self.q(tokens), self.k(tokens), self.v(tokens))
        h = h + self.o(attended).transpose(1, 2).reshape(b, c, hh, ww)
        h = self.up(nn.functional.silu(self.up_norm(torch.cat([h, skip], dim=1))))
        return self.out(nn.functional.silu(self.out_norm(h)))


def test_ratio_zero_changes_nothing():
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10)
    )
    model.train()
    x = torch.randn(4, 1, 8, 8)
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        expected = model.eval()(x)
    model.train()
    report = prune_structured(model, x[:1], ratio=0.0)
    assert model.training, "tracing left the model in eval mode"
    assert report["history"] == []
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "running stats or weights changed"
    with torch.no_grad():
        assert torch.equal(model.eval()(x), expected)


def test_params_and_macs_drop_by_the_hand_counted_amount():
    model = tiny_classifier()
    x = torch.randn(1, 1, 8, 8)
    assert count_macs_params(model, x) == hand_count(8, 8)
    report = prune_structured(model, x, importance="l2", ratio=0.5)
    assert (model[0].out_channels, model[2].in_channels, model[2].out_channels, model[6].in_features) == (4, 4, 4, 4)
    assert (report["macs_before"], report["params_before"]) == hand_count(8, 8)
    assert (report["macs_after"], report["params_after"]) == hand_count(4, 4)
    assert count_macs_params(model, x) == hand_count(4, 4)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_kept_channels_are_the_largest_l1_norm_ones():
    model = nn.Sequential(nn.Conv2d(1, 6, 1), nn.ReLU(), nn.Conv2d(6, 2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([5.0, 0.1, 4.0, 0.2, 3.0, 0.3]).view(6, 1, 1, 1))
        model[0].bias.zero_()
        model[2].weight.fill_(1.0)
    prune_structured(model, torch.randn(1, 1, 4, 4), importance="l1", ratio=0.5)
    assert model[0].weight.flatten().tolist() == [5.0, 4.0, 3.0]


def test_output_layers_are_found_by_tracing_and_kept():
    model = tiny_classifier()
    x = torch.randn(1, 1, 8, 8)
    assert find_output_layers(model, x) == [model[6]]
    head_bias = model[6].bias.detach().clone()
    prune_structured(model, x, ratio=0.5, global_pruning=True)
    assert model[6].out_features == 10 and torch.equal(model[6].bias, head_bias)

    unet = GNNet()
    example = (torch.randn(1, 3, 8, 8), torch.rand(1))
    assert find_output_layers(unet, example) == [unet.out]
    prune_structured(unet, example, ratio=0.25)
    assert unet.out.out_channels == 3


def test_ignored_layers_given_by_name_hold_on_the_copies_a_macs_search_prunes():
    x = torch.randn(1, 1, 8, 8)
    model = tiny_classifier()
    ratio = ratio_for_macs(model, x, 0.5, ignored_layers=["0"])  # the search prunes deep copies of the model
    prune_structured(model, x, ratio=ratio, ignored_layers=["0"])
    assert model[0].out_channels == 8 and model[2].out_channels < 8  # by name, the first conv kept its width
    with pytest.raises(ValueError, match="no module named 'conv9' in Sequential"):
        StructuredPruner(tiny_classifier(), x, ignored_layers=["conv9"])


def test_groupnorm_stays_valid_and_round_to_is_refused():
    model = GNNet()
    example = (torch.randn(2, 3, 8, 8), torch.rand(2))
    report = prune_structured(model, example, ratio=0.25)
    for norm in (model.norm1, model.norm2):
        assert norm.num_channels < 32 and norm.num_channels % norm.num_groups == 0
        assert norm.weight.shape == (norm.num_channels,)
    assert model(*example).shape == (2, 3, 8, 8)
    assert report["macs_after"] < report["macs_before"]
    with pytest.raises(ValueError, match="GroupNorm"):
        StructuredPruner(GNNet(), example, ratio=0.25, round_to=8)


def test_concat_fed_groupnorm_and_matmul_attention(tmp_path):
    model = SkipAttnNet()
    x = torch.randn(2, 3, 8, 8)
    custom = {NIN: MatmulPruner("W", "b")}
    with pytest.raises(ValueError, match="local pruning"):
        StructuredPruner(SkipAttnNet(), x, ratio=0.25, global_pruning=True, custom_pruners=custom)
    report = prune_structured(model, x, ratio=0.25, steps=2, custom_pruners=custom)
    assert (model.inp.out_channels, model.down.out_channels, model.up.out_channels) == (12, 12, 12)
    assert model.up_norm.num_channels == 24 and model.up_norm.num_groups == 8  # 3 + 3 channels per group pair
    assert model.q.W.shape == (12, 16) and model.o.W.shape == (16, 12), "attention inputs/outputs follow h"
    with torch.no_grad():
        out = model(x)
    save_pruned(tmp_path, model, arch={}, example_inputs=x, history=report["history"])
    loaded = load_pruned(tmp_path, build=lambda arch: SkipAttnNet(), custom_pruners=custom)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    with pytest.raises(ValueError, match="straddle"):  # 16 + 8 channels into GroupNorm(8, 24): groups of 3
        StructuredPruner(SkipAttnNet(skip=8), x, ratio=0.25, custom_pruners=custom)


def test_round_to_keeps_channel_multiples():
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    prune_structured(model, torch.randn(1, 1, 8, 8), ratio=0.3, round_to=8)
    assert model[0].out_channels % 8 == 0 and model[2].out_channels % 8 == 0 and model[0].out_channels < 32


def test_taylor_without_gradients_is_a_clear_error():
    model = tiny_classifier()
    with pytest.raises(ValueError, match="backward"):
        prune_structured(model, torch.randn(1, 1, 8, 8), importance="taylor", ratio=0.5)


def test_taylor_with_accumulated_gradients_prunes():
    model = tiny_classifier()
    batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(3)]
    loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    calls = []

    def gradients(m):
        calls.append(accumulate_gradients(m, loss, batches, stop_ratio=None))

    report = prune_structured(
        model, torch.randn(1, 1, 8, 8), importance="taylor", ratio=0.5, steps=2, compute_gradients=gradients
    )
    assert len(calls) == 2 and report["params_after"] == hand_count(4, 4)[1]


def test_iterative_steps_call_back_with_new_parameters():
    model = tiny_classifier()
    old_weight = model[0].weight
    seen = []

    def after_step(m, step_report):
        seen.append((step_report.step, m[0].out_channels, m[0].weight is old_weight))
        opt = torch.optim.SGD(m.parameters(), lr=0.1)  # built after the step, as required
        m(torch.randn(2, 1, 8, 8)).sum().backward()
        opt.step()

    report = prune_structured(model, torch.randn(1, 1, 8, 8), ratio=0.5, steps=2, after_step=after_step)
    assert seen == [(1, 6, False), (2, 4, False)], "pruned layers must hold new Parameter objects"
    assert [r["ratio"] for r in report["per_step"]] == [0.25, 0.5]


def test_save_load_replays_history_bit_identically(tmp_path):
    model = GNNet()
    example = (torch.randn(1, 3, 8, 8), torch.rand(1))
    report = prune_structured(model, example, ratio=0.25, steps=2)
    save_pruned(tmp_path, model, arch={"kind": "gnnet"}, example_inputs=example, history=report["history"])
    loaded = load_pruned(tmp_path, build=lambda arch: GNNet())
    x, t = torch.randn(4, 3, 8, 8), torch.rand(4)
    with torch.no_grad():
        assert torch.equal(loaded(x, t), model(x, t))
    assert not (tmp_path / "masks.safetensors").exists()


def tiny_vit(depth: int = 1):
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=depth, num_classes=10, in_chans=1
    )


def assert_vit_widths_match_weights(model):
    """Every width attribute a ViT reads equals the size of the weights it describes."""
    width = model.patch_embed.proj.out_channels
    assert model.embed_dim == width == model.cls_token.shape[-1] == model.pos_embed.shape[-1]
    assert model.num_features == model.head_hidden_size == model.head.in_features == model.norm.normalized_shape[0]
    for block in model.blocks:
        attn = block.attn
        assert attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim == 3 * attn.attn_dim
        assert attn.proj.in_features == attn.attn_dim


def test_timm_attention_loses_head_dims_and_keeps_widths_in_step():
    model = tiny_vit()
    x = torch.randn(1, 1, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the unwrapped cls_token / pos_embed are passed explicitly: no warning
        report = prune_structured(model, x, ratio=0.25)
    assert report["unwrapped_parameters"] == {"cls_token": 2, "pos_embed": 2}
    assert report["width_attributes_unmatched"] == []
    attn = model.blocks[0].attn
    assert attn.num_heads == 3 and attn.head_dim == 48 and model.embed_dim == 144
    assert_vit_widths_match_weights(model)
    model.reset_classifier(5)  # reads num_features: stale before widths were kept in step
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 5)


def test_timm_attention_loses_whole_heads(tmp_path):
    model = tiny_vit(depth=2)
    x = torch.randn(1, 1, 16, 16)
    report = prune_structured(model, x, ratio=0.25, head_ratio=0.34, prune_head_dims=False)
    for block in model.blocks:  # ceil(0.34 * 3) = 2 of 3 heads removed, the head size kept
        assert block.attn.num_heads == 1 and block.attn.head_dim == 64
    assert model.embed_dim == 144 and report["params_after"] < report["params_before"]
    assert_vit_widths_match_weights(model)
    model.eval()
    save_pruned(
        tmp_path,
        model,
        arch={"depth": 2},
        example_inputs=x,
        history=report["history"],
        unwrapped_parameters=report["unwrapped_parameters"],
    )
    loaded = load_pruned(tmp_path, build=lambda arch: tiny_vit(arch["depth"])).eval()
    assert loaded.blocks[1].attn.num_heads == 1
    assert_vit_widths_match_weights(loaded)
    probe = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(probe), model(probe))


def test_head_and_unwrapped_settings_are_checked():
    with pytest.raises(ValueError, match="no timm-style attention"):
        prune_structured(tiny_classifier(8, 8), torch.randn(1, 1, 8, 8), head_ratio=0.5)
    with pytest.raises(ValueError, match="head_ratio"):
        prune_structured(tiny_vit(), torch.randn(1, 1, 16, 16), head_ratio=1.0)
    with pytest.raises(ValueError, match="ratio > 0"):
        prune_structured(tiny_vit(), torch.randn(1, 1, 16, 16), ratio=0.0, head_ratio=0.5)
    with pytest.raises(ValueError, match="blocks.0.norm1.weight is not an unwrapped parameter"):
        find_unwrapped_parameters(tiny_vit(), dims={"blocks.0.norm1.weight": 0})
    with pytest.raises(ValueError, match="cannot prune dimension 3"):
        find_unwrapped_parameters(tiny_vit(), dims={"cls_token": 3})
    assert find_unwrapped_parameters(tiny_vit(), dims={"cls_token": -1}) == {"cls_token": 2, "pos_embed": 2}
    assert find_unwrapped_parameters(tiny_classifier(8, 8)) == {}


def test_ratio_for_macs_and_latency():
    model = tiny_classifier(16, 16)
    x = torch.randn(1, 1, 8, 8)
    ratio = ratio_for_macs(model, x, 0.5, iterations=6)
    trial = copy.deepcopy(model)
    prune_structured(trial, x, ratio=ratio)
    assert count_macs_params(trial, x)[0] <= 0.5 * count_macs_params(model, x)[0]
    assert count_macs_params(model, x) == hand_count(16, 16), "the model itself is left unpruned"
    assert measure_latency(model, torch.randn(2, 1, 8, 8), warmup=1, repeats=3) > 0


def groupnorm_net() -> nn.Sequential:
    """conv(1→8) → GroupNorm(4 groups of 2) → SiLU → conv(8→3): groups 1 and 3 get tiny filters."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(), nn.Conv2d(8, 3, 1))
    with torch.no_grad():
        net[0].weight[2:4].mul_(0.01)  # group 1
        net[0].weight[6:8].mul_(0.01)  # group 3
        net[0].bias.zero_()
    return net


def test_whole_groups_leave_and_the_survivors_normalise_as_before(tmp_path):
    net, original = groupnorm_net(), groupnorm_net()
    x = torch.randn(1, 1, 6, 6)
    report = prune_structured(net, x, ratio=0.5, groupnorm="whole_groups")
    assert net[1].num_groups == 2 and net[1].num_channels == 4 and net[0].out_channels == 4
    kept = [0, 1, 4, 5]  # the two weak groups (channels 2, 3 and 6, 7) left whole
    assert torch.equal(net[0].weight, original[0].weight[kept])
    probe = torch.randn(5, 1, 6, 6)
    with torch.no_grad():  # each surviving group is normalised over exactly the channels it had
        assert torch.equal(net[:2](probe), original[:2](probe)[:, kept])
    assert report["params_after"] < report["params_before"]
    save_pruned(tmp_path, net, arch={}, example_inputs=x, history=report["history"])
    loaded = load_pruned(tmp_path, build=lambda _arch: groupnorm_net())
    assert loaded[1].num_groups == 2  # the group count is not in the history: it is recorded beside it
    with torch.no_grad():
        assert torch.equal(loaded(probe), net(probe))


def test_whole_groups_at_ratio_zero_change_nothing_and_even_mode_keeps_the_group_count():
    net, original = groupnorm_net(), groupnorm_net()
    x = torch.randn(2, 1, 6, 6)
    prune_structured(net, x, ratio=0.0, groupnorm="whole_groups")
    with torch.no_grad():
        assert torch.equal(net(x), original(x))
    prune_structured(original, x, ratio=0.5)  # even: one channel from each group of two
    assert original[1].num_groups == 4 and original[1].num_channels == 4
    with pytest.raises(ValueError, match="groupnorm must be one of"):
        prune_structured(groupnorm_net(), x, groupnorm="halves")
    with pytest.raises(ValueError, match="per layer"):
        prune_structured(groupnorm_net(), x, groupnorm="whole_groups", global_pruning=True)


def test_whole_groups_reach_finer_macs_budgets_on_the_teacher():
    """The committed teacher (24/48 channels, 4 per group) pruned to student-m's MACs: even pruning can only keep
    57% or 25% of the MACs (widths move in quarters); whole groups land within 10% of the budget."""
    from teachers.pruned import example_inputs, unet_custom_pruners
    from teachers.zoo import load_model

    teacher = load_model("teachers/weights/fmnist_teacher.safetensors").float().train().requires_grad_(True)
    inputs = example_inputs(teacher.config)
    base, _ = count_macs_params(teacher, inputs)
    budget = 76_249_632 / base  # fmnist-student-m's MACs
    reached = {}
    for mode in ("even", "whole_groups"):
        kwargs = {"custom_pruners": unet_custom_pruners(), "groupnorm": mode}
        ratio = ratio_for_macs(teacher, inputs, budget, nearest=True, **kwargs)
        trial = copy.deepcopy(teacher)
        StructuredPruner(trial, inputs, ratio=ratio, **kwargs).step()
        reached[mode] = count_macs_params(trial, inputs)[0] / base
    assert abs(reached["whole_groups"] / budget - 1) < 0.10 < abs(reached["even"] / budget - 1)


def straddling_unet() -> nn.Module:
    """The project's DDPM++ UNet, small: its decoder concatenates 128 + 64 channels into GroupNorm(32, 192), groups
    of 6 that the 64 skip channels (at offset 128; 128 % 6 != 0) straddle, as 256 + 128 into 32 groups of 12 do
    at CIFAR-10 size. Random weights, so every channel matters (DDPM++ initialises some convolutions to ~0)."""
    from teachers.unet import UNet

    torch.manual_seed(0)
    net = UNet(in_channels=1, resolution=8, nf=64, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.05)
    return net.train().requires_grad_(True)


STRADDLED = {"all_modules.11.GroupNorm_0", "all_modules.14.GroupNorm_0"}  # both GroupNorm(32, 192) of the decoder


def unet_probe() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 1, 8, 8, generator=g), torch.rand(3, generator=g)


def test_regroup_count_is_the_largest_divisor_up_to_the_original_count():
    assert [regroup_count(c, 32) for c in (192, 160, 144, 96, 134, 13)] == [32, 32, 24, 32, 2, 13]


@pytest.mark.parametrize(
    ("mode", "regrouped"),
    [  # even: the 128-channel producer loses 32 and the skip 16, 144 channels take 24 groups of 6; whole_groups:
        # each producer removes a multiple of 32 (the skip none at 0.25), so the 32 groups stay
        ("even+regroup", {"channels": [192, 144], "groups": [32, 24]}),
        ("whole_groups+regroup", {"channels": [192, 160], "groups": [32, 32]}),
    ],
)
def test_a_ddpmpp_unet_whose_skip_concat_straddles_its_groupnorms_prunes_with_regroup(mode, regrouped, tmp_path):
    from teachers.pruned import unet_custom_pruners

    custom = unet_custom_pruners()
    x = (torch.zeros(1, 1, 8, 8), torch.zeros(1))
    with pytest.raises(ValueError, match="straddle its groups.*regroup"):
        StructuredPruner(straddling_unet(), x, ratio=0.25, custom_pruners=custom, groupnorm=mode.split("+")[0])
    net = straddling_unet()
    report = prune_structured(net, x, ratio=0.25, custom_pruners=custom, groupnorm=mode)
    norms = {name: m for name, m in net.named_modules() if isinstance(m, nn.GroupNorm)}
    assert all(m.num_channels % m.num_groups == 0 and m.weight.shape == (m.num_channels,) for m in norms.values())
    assert report["regrouped_groupnorms"] == {name: regrouped for name in STRADDLED}
    assert {(norms[n].num_channels, norms[n].num_groups) for n in STRADDLED} == {
        (regrouped["channels"][1], regrouped["groups"][1])
    }
    assert (report["macs_after"], report["params_after"]) == count_macs_params(net, x)
    assert report["params_after"] == sum(p.numel() for p in net.parameters())
    assert report["macs_after"] < 0.7 * report["macs_before"] and report["params_after"] < report["params_before"]
    with torch.no_grad():
        out = net(*unet_probe())
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()
    save_pruned(tmp_path, net, arch={}, example_inputs=x, history=report["history"])
    loaded = load_pruned(tmp_path, build=lambda _arch: straddling_unet(), custom_pruners=custom)
    assert {n: m.num_groups for n, m in loaded.named_modules() if n in STRADDLED} == {
        n: regrouped["groups"][1] for n in STRADDLED
    }
    with torch.no_grad():
        assert torch.equal(loaded(*unet_probe()), out)


@pytest.mark.parametrize("mode", ["even+regroup", "whole_groups+regroup"])
def test_regroup_at_ratio_zero_changes_nothing(mode):
    from teachers.pruned import unet_custom_pruners

    net, original = straddling_unet(), straddling_unet()
    x = (torch.zeros(1, 1, 8, 8), torch.zeros(1))
    report = prune_structured(net, x, ratio=0.0, custom_pruners=unet_custom_pruners(), groupnorm=mode)
    assert report["regrouped_groupnorms"] == {} and report["history"] == []
    assert [m.num_groups for m in net.modules() if isinstance(m, nn.GroupNorm)] == [
        m.num_groups for m in original.modules() if isinstance(m, nn.GroupNorm)
    ]
    with torch.no_grad():
        assert torch.equal(net(*unet_probe()), original(*unet_probe()))


@pytest.mark.parametrize("mode", ["even", "whole_groups"])
def test_regroup_changes_nothing_where_no_groupnorm_is_straddled(mode):
    """SkipAttnNet's concat (16 + 16 channels into GroupNorm(8, 32)) is aligned: "+regroup" prunes it identically."""
    x = torch.randn(2, 3, 8, 8)
    custom = {NIN: MatmulPruner("W", "b")}
    runs = []
    for groupnorm in (mode, mode + "+regroup"):
        torch.manual_seed(0)
        model = SkipAttnNet()
        report = prune_structured(model, x, ratio=0.25, custom_pruners=custom, groupnorm=groupnorm)
        runs.append((model, report))
    (plain, plain_report), (regroup, regroup_report) = runs
    assert regroup_report["history"] == plain_report["history"] and regroup_report["regrouped_groupnorms"] == {}
    assert plain_report["macs_after"] < plain_report["macs_before"]
    plain_state, regroup_state = plain.state_dict(), regroup.state_dict()
    assert plain_state.keys() == regroup_state.keys()
    assert all(torch.equal(plain_state[k], regroup_state[k]) for k in plain_state)
    assert plain.up_norm.num_groups == regroup.up_norm.num_groups


def _teacher():
    from teachers.pruned import example_inputs
    from teachers.zoo import load_model

    teacher = load_model("teachers/weights/fmnist_teacher.safetensors").float().train().requires_grad_(True)
    return teacher, example_inputs(teacher.config)


def test_per_layer_widths_hit_student_s_budget_on_the_teacher_where_one_ratio_misses(tmp_path):
    """The teacher pruned to fmnist-student-s's MACs (18.2%): one whole-group ratio for all layers moves the 24- and
    48-channel layers together and lands 11% off; per-layer refinement lands within 10%, the plan's MACs are what
    pruning the model gives (recounted), and the pruned model reloads bit-identically from its history."""
    from teachers.pruned import unet_custom_pruners
    from teachers.unet import build_unet

    teacher, inputs = _teacher()
    base, _ = count_macs_params(teacher, inputs)
    budget = 0.182
    kwargs = {"custom_pruners": unet_custom_pruners(), "groupnorm": "whole_groups"}
    one_ratio = copy.deepcopy(teacher)
    ratio = ratio_for_macs(teacher, inputs, budget, nearest=True, **kwargs)
    StructuredPruner(one_ratio, inputs, ratio=ratio, **kwargs).step()
    assert abs(count_macs_params(one_ratio, inputs)[0] / base / budget - 1) > 0.10

    plan = plan_for_macs(teacher, inputs, budget, nearest=True, **kwargs)
    assert plan.extra_blocks > 0 and abs(plan.fraction / budget - 1) < 0.10
    pruned = copy.deepcopy(teacher)
    report = prune_structured(pruned, inputs, ratio=plan.ratio, extra_blocks=plan.extra_blocks, **kwargs)
    macs, params = count_macs_params(pruned, inputs)
    assert (macs, params) == (report["macs_after"], report["params_after"]) and macs / base == plan.fraction
    assert report["extra_blocks"] == plan.extra_blocks and report["per_step"][-1]["macs"] == macs
    norms = [m for m in pruned.modules() if isinstance(m, nn.GroupNorm)]
    assert all(m.num_channels == 4 * m.num_groups for m in norms)  # whole groups of 4 only
    save_pruned(tmp_path, pruned, arch={}, example_inputs=inputs, history=report["history"])
    loaded = load_pruned(
        tmp_path, build=lambda _arch: build_unet(teacher.config), custom_pruners=kwargs["custom_pruners"]
    )
    probe = (torch.randn(3, *inputs[0].shape[1:], generator=torch.Generator().manual_seed(0)), torch.rand(3))
    with torch.no_grad():
        out = pruned.eval()(*probe)
        assert out.shape == probe[0].shape and torch.equal(loaded.eval()(*probe), out)


@pytest.mark.parametrize(
    "preset, budget", [("fmnist-student-s", 0.15), ("fmnist-student-m", 0.4), ("fmnist-student-l", 0.8)]
)
def test_per_layer_widths_hit_budgets_within_ten_percent_on_the_student_presets(preset, budget):
    """At most the budget and within 10% of it (benchmarks/fmnist-pareto/README.md, "Budgets", has the full grid)."""
    from teachers.pruned import example_inputs, unet_custom_pruners
    from teachers.unet import build_unet
    from teachers.zoo import resolve_model_config

    torch.manual_seed(0)
    model = build_unet(resolve_model_config({"preset": preset})).train().requires_grad_(True)
    inputs = example_inputs(model.config)
    base, _ = count_macs_params(model, inputs)
    kwargs = {"custom_pruners": unet_custom_pruners(), "groupnorm": "whole_groups"}
    at_most = plan_for_macs(model, inputs, budget, iterations=5, **kwargs)
    assert budget * 0.9 <= at_most.fraction <= budget, at_most
    pruned = copy.deepcopy(model)
    report = prune_structured(pruned, inputs, ratio=at_most.ratio, extra_blocks=at_most.extra_blocks, **kwargs)
    assert report["macs_after"] == count_macs_params(pruned, inputs)[0] == round(at_most.fraction * base)
    with torch.no_grad():
        assert pruned(*example_inputs(model.config, batch=2)).shape == (2, 1, 32, 32)


def test_per_layer_refinement_needs_whole_groups_and_round_to_sets_the_removal_step():
    net = groupnorm_net()
    x = torch.randn(1, 1, 6, 6)
    with pytest.raises(ValueError, match="whole_groups"):
        plan_for_macs(net, x, 0.5)
    with pytest.raises(ValueError, match="whole_groups"):
        prune_structured(groupnorm_net(), x, ratio=0.25, extra_blocks=1)
    pruner = StructuredPruner(net, x, ratio=0.0, groupnorm="whole_groups")
    with pytest.raises(RuntimeError, match="after the 1 pruning steps"):
        pruner.remove_block()
    pruner.step()
    assert pruner.remove_block() and net[1].num_groups == 3  # one group of 2 channels
    assert pruner.remove_block() and pruner.remove_block() and net[1].num_groups == 1
    assert not pruner.remove_block() and net[0].out_channels == 2  # one group always stays
    # round_to: whole groups leave in multiples of round_to channels (two groups of 2 here)
    for ratio, width in ((0.25, 8), (0.5, 4)):  # 0.25: one group of 2 is due, fewer than 4 channels: none leaves
        rounded = groupnorm_net()
        prune_structured(rounded, x, ratio=ratio, groupnorm="whole_groups", round_to=4)
        assert rounded[0].out_channels == width and rounded[1].num_groups == width // 2
    pruner = StructuredPruner(groupnorm_net(), x, ratio=0.0, groupnorm="whole_groups", round_to=4)
    pruner.step()
    assert pruner.remove_block() and pruner.model[0].out_channels == 4 and not pruner.remove_block()


def test_per_layer_refinement_with_regroup_keeps_straddled_groupnorms_valid_and_replays(tmp_path):
    """whole_groups+regroup on the DDPM++ UNet whose skip concat straddles GroupNorm(32, 192): the extra blocks of a
    layer feeding it come in multiples of 32 channels, every GroupNorm stays valid and the file replays exactly."""
    from teachers.pruned import unet_custom_pruners

    custom = unet_custom_pruners()
    x = (torch.zeros(1, 1, 8, 8), torch.zeros(1))
    kwargs = {"custom_pruners": custom, "groupnorm": "whole_groups+regroup"}
    one_ratio = straddling_unet()
    before = prune_structured(one_ratio, x, ratio=0.25, **kwargs)["macs_after"]
    net = straddling_unet()
    report = prune_structured(net, x, ratio=0.25, extra_blocks=8, **kwargs)
    assert report["extra_blocks"] == 8 and report["macs_after"] == count_macs_params(net, x)[0] < before
    norms = {name: m for name, m in net.named_modules() if isinstance(m, nn.GroupNorm)}
    assert all(m.num_channels % m.num_groups == 0 for m in norms.values())
    assert {norms[n].num_groups for n in STRADDLED} == {32}
    with torch.no_grad():
        out = net(*unet_probe())
    save_pruned(tmp_path, net, arch={}, example_inputs=x, history=report["history"])
    loaded = load_pruned(tmp_path, build=lambda _arch: straddling_unet(), custom_pruners=custom)
    with torch.no_grad():
        assert torch.equal(loaded(*unet_probe()), out)
