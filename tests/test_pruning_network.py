"""timm / torchvision networks pruned end to end on real Fashion-MNIST, and the prune_network entry point."""

import json

import pytest
import torch
from safetensors.torch import save_file

from pruning import (
    accumulate_gradients,
    build_model,
    classification_loss,
    create_model,
    fine_tune,
    image_batches,
    load_masks,
    load_pruned,
    model_spec,
    prune_network,
    prune_structured,
    save_pruned,
)
from slimflow.data import load_images  # the data adapter an entry point passes in


@pytest.fixture(scope="module")
def fmnist():
    data = load_images("fashion_mnist", split="test", image_size=28)
    return data.images[:64], data.labels[:64]


def test_timm_resnet18_prune_finetune_forward_save_load(fmnist, tmp_path):
    images, labels = fmnist
    spec = model_spec("timm:resnet18", num_classes=10, in_chans=1)
    model = build_model(spec)
    report = prune_structured(model, torch.zeros(1, 1, 28, 28), importance="l2", ratio=0.5, round_to=8)
    assert report["params_after"] < 0.3 * report["params_before"]
    assert model.conv1.out_channels % 8 == 0 and model.fc.out_features == 10
    losses = fine_tune(model, classification_loss, image_batches(images, labels, 16), steps=1, lr=1e-3)
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses[0]))
    x = next(image_batches(images, labels, 8, shuffle=False))[0]
    with torch.no_grad():
        out = model.eval()(x)
    assert out.shape == (8, 10)
    save_pruned(tmp_path, model, arch=spec, example_inputs=torch.zeros(1, 1, 28, 28), history=report["history"])
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path).eval()(x), out)


def test_torchvision_mobilenet_taylor_prune_finetune_forward(fmnist):
    images, labels = fmnist
    model = build_model(model_spec("torchvision:mobilenet_v3_small", num_classes=10, in_chans=3))
    batches = list(image_batches(images, labels, 16, channels=3))
    assert batches[0][0].shape == (16, 3, 28, 28)
    report = prune_structured(
        model,
        torch.zeros(1, 3, 28, 28),
        importance="taylor",
        ratio=0.3,
        compute_gradients=lambda m: accumulate_gradients(m, classification_loss, batches[:2], stop_ratio=None),
    )
    assert report["macs_after"] < report["macs_before"] and model.classifier[-1].out_features == 10
    fine_tune(model, classification_loss, batches[2:], steps=1, lr=1e-3)
    assert model.eval()(batches[0][0]).shape == (16, 10)


def test_prune_network_structured_writes_a_reloadable_model(tmp_path):
    report = prune_network(
        model="timm:resnet18",
        out_dir=tmp_path,
        load_images=load_images,
        image_size=28,
        method="l1",
        ratio=0.5,
        steps=2,
        finetune_epochs=1.0,
        batch_size=32,
        max_train_images=64,
        max_eval_images=64,
        latency_batch_size=4,
    )
    assert report["after"]["macs"] < 0.5 * report["before"]["macs"]
    assert set(report["after"]["latency_ms"]) == {"1", "4"} and len(report["phases"]) == 2
    assert 0.0 <= report["after"]["accuracy"] <= 1.0 and 0.0 < report["phases"][0]["dnr_train"] < 1.0
    assert json.loads((tmp_path / "report.json").read_text())["method"] == "l1"
    loaded = load_pruned(tmp_path).eval()
    assert loaded.conv1.out_channels == 32 and loaded(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_prune_network_ap_keeps_masks(tmp_path):
    report = prune_network(
        model="torchvision:mobilenet_v3_small",
        out_dir=tmp_path,
        load_images=load_images,
        image_size=28,
        method="ap",
        sparsity=0.75,
        steps=2,
        finetune_epochs=0.5,
        batch_size=32,
        max_train_images=64,
        max_eval_images=32,
        latency_batch_size=2,
    )
    assert report["unstructured"]["sparsity"] == pytest.approx(0.75, abs=0.01)
    assert len(report["phases"]) == 3  # one phase before the first cut, one after each
    model = load_pruned(tmp_path)
    masks = load_masks(tmp_path)
    for name, param in model.named_parameters():
        if name in masks.masks:
            assert (param[~masks.masks[name]] == 0).all()
    assert "classifier.3.weight" not in masks.masks and "classifier.0.weight" in masks.masks, "head kept whole"


def test_missing_pretrained_weights_name_the_file():
    spec = model_spec("torchvision:resnet18", num_classes=10, in_chans=3)
    with pytest.raises(FileNotFoundError, match="resnet18-f37072fd.pth"):
        create_model(spec, pretrained=True)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        create_model(spec, pretrained="/nowhere.pth")
    with pytest.raises(ValueError, match="in_chans"):
        model_spec("torchvision:resnet18", num_classes=10, in_chans=1)
    with pytest.raises(ValueError, match="timm:<name>"):
        model_spec("resnet18", num_classes=10, in_chans=1)


def test_user_checkpoint_is_loaded_strictly(tmp_path):
    spec = model_spec("timm:resnet18", num_classes=10, in_chans=1)
    source = build_model(spec)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "mine.safetensors"))
    model = create_model(spec, checkpoint=str(tmp_path / "mine.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    wrong = model_spec("timm:resnet18", num_classes=5, in_chans=1)
    with pytest.raises(ValueError, match="does not fit timm:resnet18 .*size mismatch for fc.weight"):
        create_model(wrong, checkpoint=str(tmp_path / "mine.safetensors"))
