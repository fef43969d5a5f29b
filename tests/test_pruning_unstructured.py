"""Unstructured magnitude / AP pruning with masks: exact counts, AP picks negatives, masks survive optimizers."""

import copy

import pytest
import torch
from torch import nn

from pruning import (
    WeightMasks,
    classification_loss,
    cycle_rate,
    fine_tune,
    iterative_pruning,
    n_of_m_masks,
    prunable_weights,
    prune_cycle,
    rewind,
    snapshot,
)


def relu_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 10))


def random_batches(n: int = 50):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 4, 4, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(n)]


def test_magnitude_cycle_removes_exactly_the_smallest_weights():
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1.0, 13.0).view(3, 4) * torch.tensor([1.0, -1.0, 1.0, -1.0]))
        model[1].weight.copy_(torch.tensor([[0.5, 13.0, -1.5], [14.0, 2.5, 15.0]]))
    masks = prune_cycle(model, WeightMasks.dense(model), rate=0.5)  # 9 of 18 weights: |w| 0.5, 1, 1.5, ..., 6
    assert masks.alive() == 9
    assert sorted(model[0].weight.abs()[masks.masks["0.weight"]].tolist()) == [7.0, 8.0, 9.0, 10.0, 11.0, 12.0]
    assert sorted(model[1].weight[masks.masks["1.weight"]].tolist()) == [13.0, 14.0, 15.0]
    assert int((model[0].weight == 0).sum() + (model[1].weight == 0).sum()) == 9


def test_layer_scope_prunes_each_layer_by_the_rate():
    model = relu_net()
    masks = prune_cycle(model, WeightMasks.dense(model), rate=0.25, scope="layer")
    assert masks.masks["0.weight"].sum() == 36 - 9 and masks.masks["3.weight"].sum() == 640 - 160


def test_lamp_scores_closed_form_and_scale_free_layers():
    from pruning import lamp_scores

    w = torch.tensor([3.0, -1.0, 2.0, 0.5])
    alive = torch.tensor([True, True, True, False])
    # surviving squares 1, 4, 9 (sorted): 1/14, 4/13, 9/9; the masked weight never ranks
    expected = torch.tensor([1.0, 1 / 14, 4 / 13, float("inf")], dtype=torch.float64)
    assert torch.allclose(lamp_scores(w, alive), expected)
    assert torch.equal(lamp_scores(100 * w, alive), lamp_scores(w, alive))
    # global magnitude empties a layer of small weights; LAMP keeps its largest weights
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    with torch.no_grad():
        model[1].weight.mul_(1e-3)
    by_magnitude = prune_cycle(copy.deepcopy(model), WeightMasks.dense(model), rate=0.5, scope="global")
    by_lamp = prune_cycle(copy.deepcopy(model), WeightMasks.dense(model), rate=0.5, scope="lamp")
    assert by_magnitude.masks["1.weight"].sum() == 0
    assert by_lamp.masks["1.weight"].sum() > 0 and by_lamp.alive() == by_magnitude.alive() == 64


def test_ap_step_removes_only_negative_weights_that_moved_least():
    model = relu_net()
    start = snapshot(model)
    fine_tune(model, classification_loss, random_batches(), steps=20, lr=1e-2)
    masks = WeightMasks.dense(model)
    trained = {n: w.detach().clone() for n, w in prunable_weights(model).items()}
    new = prune_cycle(model, masks, rate=0.2, ap_fraction=1.0, start_weights=start)
    total = masks.total()
    assert new.alive() == total - round(0.2 * total)
    change = {}
    for name, w in trained.items():
        removed = ~new.masks[name]
        assert (w[removed] < 0).all(), "AP must remove negative weights only"
        change[name] = (w - start[name]).abs()
    removed_change = torch.cat([change[n][~new.masks[n]] for n in trained])
    kept_negative_change = torch.cat([change[n][new.masks[n] & (trained[n] < 0)] for n in trained])
    assert removed_change.max() <= kept_negative_change.min()


def test_ap_share_of_a_cycle_and_its_precondition():
    model = relu_net()
    start = snapshot(model)
    fine_tune(model, classification_loss, random_batches(), steps=10, lr=1e-2)
    trained = {n: w.detach().clone() for n, w in prunable_weights(model).items()}
    masks = prune_cycle(model, WeightMasks.dense(model), rate=0.5, ap_fraction=0.1, start_weights=start)
    total = masks.total()
    assert masks.alive() == total - round(0.5 * total)
    magnitude_cut = round(0.5 * total) - round(0.1 * round(0.5 * total))
    threshold = torch.cat([w.abs().flatten() for w in trained.values()]).sort().values[magnitude_cut - 1]
    small = {n: trained[n].abs() <= threshold for n in trained}
    assert all((~masks.masks[n])[small[n]].all() for n in trained), "the magnitude part removes the smallest"
    ap_removed = torch.cat([trained[n][~small[n] & ~masks.masks[n]] for n in trained])
    assert len(ap_removed) == round(0.1 * round(0.5 * total)) and (ap_removed < 0).all()
    with pytest.raises(ValueError, match="start_weights"):
        prune_cycle(model, masks, rate=0.2, ap_fraction=0.1)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.Adam(p, lr=1e-2),
        lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    ],
)
def test_masked_weights_stay_exactly_zero_through_optimizer_steps(make_opt):
    model = relu_net()
    opt = make_opt(model.parameters())
    batches = random_batches(10)
    for batch in batches[:3]:  # build up momentum / Adam moments on every weight first
        opt.zero_grad()
        classification_loss(model, batch).backward()
        opt.step()
    masks = prune_cycle(model, WeightMasks.dense(model), rate=0.6)
    with masks.enforced(model, opt):
        for batch in batches[3:]:
            opt.zero_grad()
            classification_loss(model, batch).backward()
            for name, w in prunable_weights(model).items():
                assert (w.grad[~masks.masks[name]] == 0).all()
            opt.step()
            for name, w in prunable_weights(model).items():
                assert (w[~masks.masks[name]] == 0).all()
    assert masks.sparsity() == pytest.approx(0.6, abs=1e-3)


def test_masks_save_load_and_rewind(tmp_path):
    model = relu_net()
    init = snapshot(model)
    masks = prune_cycle(model, WeightMasks.dense(model), rate=0.5)
    masks.save(tmp_path / "masks.safetensors")
    loaded = WeightMasks.load(tmp_path / "masks.safetensors")
    assert all(torch.equal(loaded.masks[n], masks.masks[n]) for n in masks.masks)
    fresh = relu_net()
    loaded.apply(fresh)
    assert all((w[~masks.masks[n]] == 0).all() for n, w in prunable_weights(fresh).items())
    rewind(model, init, loaded)
    for name, w in prunable_weights(model).items():
        assert torch.equal(w, init[name] * masks.masks[name])
    with pytest.raises(FileNotFoundError):
        WeightMasks.load(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="shape"):
        WeightMasks({"0.weight": torch.ones(2, 2, dtype=torch.bool)}).apply(model)


def test_iterative_pruning_hits_each_target_and_trains_masked():
    model = relu_net()
    start = snapshot(model)
    batches = random_batches(40)
    fine_tune(model, classification_loss, batches, steps=5, lr=1e-2)
    seen = []

    def train(m, masks):
        calls = []
        fine_tune(
            m,
            classification_loss,
            batches,
            steps=5,
            lr=1e-2,
            optimizer="sgd",
            weight_decay=1e-3,
            masks=masks,
            on_step=lambda model, step, loss: calls.append(step),
        )
        assert calls == [0, 1, 2, 3, 4]

    def after(m, masks, target):
        zeros = sum(int((w == 0).sum()) for w in prunable_weights(m).values())
        seen.append((target, masks.sparsity(), zeros / masks.total()))

    iterative_pruning(model, [0.5, 0.8, 0.9], train, start_weights=start, ap_fraction=0.1, after_cycle=after)
    for target, sparsity, zeros in seen:
        assert sparsity == pytest.approx(target, abs=2e-3) and zeros >= sparsity
    assert cycle_rate(0.5, 0.8) == pytest.approx(0.6)


def test_two_of_four_masks_keep_exactly_the_two_largest_of_every_group_along_the_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8, 4))
    masks, dense = n_of_m_masks(model, 2, 4)
    assert dense == ["0.weight"]  # 3 input channels: no whole group of four
    for name, param in model.named_parameters():
        if name not in masks.masks:
            continue
        mask = masks.masks[name]
        w = param.detach().abs().movedim(1, -1)
        groups = mask.movedim(1, -1).reshape(*w.shape[:-1], -1, 4)
        assert (groups.sum(dim=-1) == 2).all()  # exactly two of every four, all along the input dimension
        kept = w.reshape(groups.shape)[groups].reshape(*groups.shape[:-1], 2)
        dropped = w.reshape(groups.shape)[~groups].reshape(*groups.shape[:-1], 2)
        assert (kept.min(dim=-1).values >= dropped.max(dim=-1).values).all()
    assert masks.sparsity() == pytest.approx(0.5)
    masks.apply(model)
    assert (model[2].weight[~masks.masks["2.weight"]] == 0).all()
    with pytest.raises(ValueError, match="0 < n < m"):
        n_of_m_masks(model, 4, 4)
    with pytest.raises(ValueError, match="nothing to mask"):
        n_of_m_masks(nn.Linear(3, 2))
