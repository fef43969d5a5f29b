"""timm / torchvision networks pruned end to end on real Fashion-MNIST, and the prune_network entry point."""

import json
import textwrap

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
from slimflow.cli import main
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
        random_init=True,
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
        random_init=True,
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


TINY_RUN = ["--finetune-epochs", "1", "--batch-size", "32", "--max-train-images", "64", "--max-eval-images", "32"]


def test_cli_prunes_heads_of_a_timm_vit_and_keeps_its_widths_true(tmp_path, capsys):
    out = tmp_path / "vit"
    argv = ["prune-net", "--model", "timm:vit_tiny_patch16_224", "--model-kwargs", "img_size=32", "patch_size=4"]
    argv += ["depth=2", "--random-init", "--ratio", "0.25", "--head-ratio", "0.33", "--latency-batch-size", "0"]
    main([*argv, *TINY_RUN, "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert report["reloaded_identical"] is True and set(report["after"]["latency_ms"]) == {"1"}
    assert report["structured"]["unwrapped_parameters"] == {"cls_token": 2, "pos_embed": 2}
    model = load_pruned(out).eval()
    assert model.patch_embed.proj.kernel_size == (4, 4) and model.pos_embed.shape[1] == 1 + 64
    for block in model.blocks:  # 1 of 3 heads gone, a quarter of each head's dimensions gone
        attn = block.attn
        assert attn.num_heads == 2 and attn.head_dim == 48
        assert attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim and attn.proj.in_features == 96
    width = model.patch_embed.proj.out_channels
    assert width == 144 and model.embed_dim == width == model.cls_token.shape[-1]
    assert model.num_features == model.head_hidden_size == model.head.in_features == width
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    log = (out / "log.txt").read_text()
    assert "phase 1/1" in log and "wrote" in log


USER_NET = """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, width=8, num_classes=10):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            )
            self.head = nn.Linear(2 * width, num_classes)

        def forward(self, x):
            return self.head(self.features(x).mean(dim=(2, 3)))
"""


def test_cli_prunes_a_users_own_module_and_reloads_it_only_when_trusted(tmp_path):
    (tmp_path / "mynet.py").write_text(textwrap.dedent(USER_NET))
    out = tmp_path / "pruned"
    argv = ["prune-net", "--model", f"{tmp_path / 'mynet.py'}:Net", "--model-kwargs", "width=16", "--random-init"]
    main([*argv, "--ratio", "0.5", "--image-size", "28", "--latency-batch-size", "4", *TINY_RUN, "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["kwargs"] == {"width": 16} and report["reloaded_identical"] is True
    assert report["after"]["params"] < 0.4 * report["before"]["params"]
    with pytest.raises(ValueError, match="import_code=True"):
        load_pruned(out)
    model = load_pruned(out, import_code=True).eval()
    assert model.features[0].out_channels == 8 and model.head.in_features == 16 and model.head.out_features == 10


def test_cli_refuses_before_any_work(tmp_path, capsys):
    def error(argv):
        with pytest.raises(SystemExit) as exc:
            main(["prune-net", *argv, "--out", str(tmp_path / "o")])
        return str(exc.value.code)

    assert "--random-init" in error(["--model", "timm:resnet18"])  # no weights given
    assert "no weights" in error(["--model", "timm:resnet18"])
    message = error(["--model", "timm:vit_tiny_patch16_224", "--random-init"])  # 224-px ViT, 32-px images
    assert "cannot take inputs of shape (1, 1, 32, 32)" in message and "img_size" in message
    assert "not an nn.Module class" in error(["--model", "torch.nn:functional", "--random-init"])
    assert "does not take the model arguments" in error(
        ["--model", "timm:resnet18", "--model-kwargs", "wdith=3", "--random-init"]
    )
    assert "num_classes cannot be a model argument" in error(
        ["--model", "timm:resnet18", "--model-kwargs", "num_classes=3", "--random-init"]
    )
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_cli_preset_print_config_and_overrides(tmp_path, capsys):
    import yaml

    argv = ["prune-net", "--config", "prune-net/vit-tiny-fmnist", "--ratio", "0.5", "--model-kwargs", "depth=2"]
    main([*argv, "--print-config"])
    settings = yaml.safe_load(capsys.readouterr().out)
    assert settings["model"] == "timm:vit_tiny_patch16_224" and settings["head_ratio"] == 0.33  # from the preset
    assert settings["ratio"] == 0.5 and settings["model_kwargs"] == {"img_size": 32, "patch_size": 4, "depth": 2}
    assert settings["lr"] == 0.001 and settings["prune_head_dims"] is True and settings["random_init"] is False
    assert not (tmp_path / "runs").exists()
    (tmp_path / "bad.yaml").write_text("model: timm:resnet18\nratoi: 0.5\n")
    with pytest.raises(SystemExit, match="unknown prune-net settings ratoi"):
        main(["prune-net", "--config", str(tmp_path / "bad.yaml"), "--print-config"])


def test_prune_network_two_of_four_keeps_the_pattern_through_recovery_and_reload(tmp_path):
    report = prune_network(
        model="timm:resnet18",
        out_dir=tmp_path,
        load_images=load_images,
        random_init=True,
        image_size=28,
        method="2:4",
        finetune_epochs=1.0,
        batch_size=32,
        max_train_images=64,
        max_eval_images=32,
        latency_batch_size=0,
        progress=False,
    )
    assert report["semi_structured"]["dense_layers"] == ["conv1.weight"]  # 1 input channel
    model, masks = load_pruned(tmp_path), load_masks(tmp_path)
    assert "fc.weight" not in masks.masks  # the classifier is kept whole
    for name, param in model.named_parameters():
        if name in masks.masks:
            nonzero = (param != 0).movedim(1, -1)
            groups = nonzero.reshape(*nonzero.shape[:-1], -1, 4).sum(dim=-1)
            assert (groups <= 2).all(), name  # after fine-tuning, still at most two of every four
