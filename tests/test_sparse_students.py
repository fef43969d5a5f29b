"""Weight sparsity on flow students (`slimflow prune`'s `sparsity` section): magnitude and AP cycles with recovery,
2:4 masks, masks that stay in the model file, and the dead-neuron rate of the UNet's SiLUs."""

import json

import pytest
import torch
from torch import nn

from pruning import WeightMasks, attach_masks, masks_of
from slimflow.checkpoint import read_model_file, save_model
from slimflow.engine import Trainer
from slimflow.stages.prune import prune_student
from teachers.pruned import example_inputs
from teachers.unet import build_unet
from teachers.zoo import load_model

TINY = {
    "in_channels": 1,
    "resolution": 16,
    "nf": 16,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [8],
    "dropout": 0.0,
}
TRAIN = {"steps": 12, "batch_size": 8, "lr": 1e-3, "warmup": 2, "log_every": 4, "ckpt_every": 6, "eval_every": 6}
RECOVER = {"mode": "one_step", "distance": "l2", "train": {**TRAIN, "ema": {"kind": "fixed", "decay": 0.9}}}


def random_unet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build_unet(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny 'distilled' student and the weights it had when that training began (the AP reference)."""
    root = tmp_path_factory.mktemp("students")
    start = random_unet(0)
    end = random_unet(0)
    with torch.no_grad():  # training moved every weight a little, some more than others
        for p in end.parameters():
            p.add_(0.01 * torch.randn_like(p))
    meta = {"model": start.config, "kind": "distilled-student", "one_step_time": 0.0}
    return save_model(root / "student.safetensors", end, meta), save_model(root / "start.safetensors", start, meta)


def outputs(model: nn.Module) -> torch.Tensor:
    x, _ = example_inputs(TINY, batch=3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return model(torch.randn(x.shape, generator=g), torch.rand(3, generator=g))


def config(files, tmp_path, **sparsity) -> dict:
    return {
        "out": str(tmp_path / "p"),
        "student": str(files[0]),
        "prune": {"channels": False},
        "sparsity": sparsity,
        "recover": RECOVER,
        "compare": {"n": 8, "seed": 0},
    }


def test_cycles_reach_their_targets_and_masked_weights_stay_zero_through_recovery_and_reload(files, tmp_path):
    summary = prune_student(config(files, tmp_path, targets=[0.5, 0.8], ap_fraction=0.1, ap_reference=str(files[1])))
    cycles = summary["sparsity"]["cycles"]
    assert [c["name"] for c in cycles] == ["sparse-50%", "sparse-80%"]
    previous = None
    for cycle, target in zip(cycles, [0.5, 0.8]):
        assert cycle["sparsity"] == pytest.approx(target, abs=1e-4)
        assert cycle["history"][-1]["ap_fraction"] == 0.1 and not cycle["history"][-1]["notes"]
        model = load_model(cycle["file"])  # the recovered file: masks re-attached on load
        masks = masks_of(model)
        assert masks is not None and masks.sparsity() == pytest.approx(target, abs=1e-4)
        params = dict(model.named_parameters())
        assert all(torch.equal(params[n][~m], torch.zeros_like(params[n][~m])) for n, m in masks.masks.items())
        # recovery trained the surviving weights
        masked = load_model(cycle["file"].replace("recovered_ema", "masked"))
        assert not torch.equal(outputs(model), outputs(masked))
        if previous is not None:  # a later cycle only removes more
            assert all(not (m & ~previous.masks[n]).any() for n, m in masks.masks.items())
        previous = masks
    rows = summary["models"]
    assert rows["sparse-80%"]["nonzero_params"] < rows["sparse-50%"]["nonzero_params"] < rows["unpruned"]["params"]
    assert rows["sparse-80%"]["sparse_bytes"] < rows["sparse-50%"]["sparse_bytes"] < rows["sparse-80%"]["file_bytes"]
    assert rows["sparse-80%"]["macs"] == rows["unpruned"]["macs"]  # dense kernels: no MACs saved
    assert 0.0 < rows["sparse-80%"]["dnr"] < 1.0 and rows["sparse-80%"]["dnr_layers"]
    recover = cycles[1]["recover"]
    assert "eval/dnr" in recover["eval"] and any(k.startswith("eval/dnr/") for k in recover["eval"])

    # a second run finds every cycle current; one more target adds one cycle and reuses the others
    again = prune_student(config(files, tmp_path, targets=[0.5, 0.8, 0.9], ap_fraction=0.1, ap_reference=str(files[1])))
    assert [c["status"] for c in again["sparsity"]["cycles"]] == ["skipped", "skipped", "ran"]
    assert [c["recover"]["status"] for c in again["sparsity"]["cycles"]][:2] == ["skipped", "skipped"]
    for before, now in zip(cycles, again["sparsity"]["cycles"]):  # a skipped cycle reports the times it took
        assert now["seconds"] == before["seconds"] and now["recover"]["seconds"] == before["recover"]["seconds"]


def test_ap_removes_only_surviving_negative_weights(files, tmp_path):
    summary = prune_student(
        {
            **config(files, tmp_path, targets=[0.3], ap_fraction=1.0, ap_reference=str(files[1])),
            "recover": {"mode": "none"},
        }
    )
    student = load_model(files[0])
    masks = masks_of(load_model(summary["sparsity"]["final"]))
    params = dict(student.named_parameters())
    removed = torch.cat([params[n].detach()[~m] for n, m in masks.masks.items()])
    assert len(removed) > 0 and (removed < 0).all()
    # without a reference, the first cycle has no training phase to compare: magnitude alone, and it says so
    plain = prune_student(
        {**config(files, tmp_path / "b", targets=[0.3], ap_fraction=1.0), "recover": {"mode": "none"}}
    )
    assert plain["sparsity"]["cycles"][0]["history"][-1]["ap_fraction"] == 0.0
    assert "magnitude alone" in plain["sparsity"]["cycles"][0]["history"][-1]["notes"][0]


def test_two_of_four_pattern_on_a_student(files, tmp_path):
    summary = prune_student({**config(files, tmp_path, pattern="2:4"), "recover": {"mode": "none"}})
    model = load_model(summary["sparsity"]["final"])
    masks = masks_of(model)
    params = dict(model.named_parameters())
    assert "all_modules.2.weight" not in masks.masks  # the 1-channel input convolution stays dense
    for name, mask in masks.masks.items():
        groups = mask.movedim(1, -1).reshape(-1, 4)
        assert (groups.sum(dim=1) == 2).all(), name
        nonzero = (params[name].detach() != 0).movedim(1, -1).reshape(-1, 4)
        assert (nonzero.sum(dim=1) <= 2).all(), name


def test_sparse_file_reloads_bit_identically_and_refuses_missing_masks(tmp_path):
    model = random_unet(3)
    masks = WeightMasks({n: torch.rand(w.shape) > 0.7 for n, w in WeightMasks.dense(model).masks.items()})
    attach_masks(model, masks)
    record = {"layers": list(masks.masks), "sparsity": masks.sparsity(), "history": []}
    path = save_model(tmp_path / "s.safetensors", model, {"model": TINY, "weight_masks": record})
    loaded = load_model(path)
    assert torch.equal(outputs(loaded), outputs(model))
    assert all(torch.equal(a, b) for a, b in zip(masks_of(loaded).masks.values(), masks.masks.values()))
    # a sidecar that promises masks the weights file does not hold is a clear error
    dense = save_model(tmp_path / "d.safetensors", random_unet(3), {"model": TINY})
    sidecar = json.loads(dense.with_suffix(".json").read_text())
    dense.with_suffix(".json").write_text(json.dumps({**sidecar, "weight_masks": record}))
    with pytest.raises(Exception, match="missing: .*weight_mask"):
        load_model(dense)


def test_the_trainer_keeps_masked_weights_zero_with_adamw_and_weight_decay(tmp_path):
    model = random_unet(4)
    masks = WeightMasks({n: torch.rand(w.shape) > 0.5 for n, w in WeightMasks.dense(model).masks.items()})
    attach_masks(model, masks)
    cfg = {"steps": 3, "batch_size": 4, "optimizer": "adamw", "weight_decay": 0.1, "lr": 1e-2, "ckpt_every": 0}
    trainer = Trainer(model, cfg, tmp_path / "run", {"model": TINY})

    def batch(step, gen):
        return {"x": torch.randn(4, 1, 16, 16, generator=gen), "t": torch.rand(4, generator=gen)}

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.fit(batch, lambda net, b: net(b["x"], b["t"]).square().mean())
    for net in (trainer.model, trainer.ema):
        params = dict(net.named_parameters())
        assert all((params[n][~m] == 0).all() for n, m in masks.masks.items())
        assert all(not torch.equal(params[n][m], before[n][m]) for n, m in masks.masks.items())  # the rest trained


def test_bad_sparsity_settings_stop_before_any_work(files, tmp_path):
    cases = [
        ({"targets": [1.0]}, "must lie in \\(0, 1\\)"),
        ({"targets": [-0.1]}, "must lie in \\(0, 1\\)"),
        ({"targets": [0.8, 0.5]}, "increase strictly"),
        ({"targets": [0.5], "ap_fraction": 1.5}, "ap_fraction"),
        ({"pattern": "3:8"}, "sparsity.pattern"),
        ({"pattern": "2:4", "targets": [0.5]}, "leave sparsity.targets empty"),
        ({"targets": [0.5], "ap_reference": str(tmp_path / "nope.safetensors")}, "does not exist"),
        ({"targets": []}, "nothing to prune"),
    ]
    for sparsity, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            prune_student(config(files, tmp_path, **sparsity))
    assert not (tmp_path / "p").exists()
    with pytest.raises(ValueError, match="no Conv/Linear weights"):
        WeightMasks.dense(nn.Sequential(nn.SiLU(), nn.GroupNorm(1, 4)))


def test_channels_then_weights_and_onnx_export_with_parity(files, tmp_path):
    pytest.importorskip("onnxscript", reason="ONNX export needs the optional extra slimflow[onnx]")
    pytest.importorskip("onnxruntime", reason="the ONNX parity check needs the optional extra slimflow[onnx]")
    from slimflow.stages.export import export_model

    cfg = config(files, tmp_path, targets=[0.6])
    cfg["prune"] = {"macs_fraction": 0.6, "macs_match": "nearest"}
    cfg["recover"] = {**RECOVER, "train": {**TRAIN, "steps": 3, "eval_every": 0, "ema": {"kind": "none"}}}
    summary = prune_student(cfg)
    final = summary["sparsity"]["final"]
    sidecar = read_model_file(final)[0]
    assert sidecar["pruning"]["history"] and sidecar["weight_masks"]["sparsity"] == pytest.approx(0.6, abs=1e-4)
    assert summary["models"]["sparse-60%"]["params"] == summary["models"]["recovered"]["params"]
    assert summary["models"]["sparse-60%"]["params"] < summary["models"]["unpruned"]["params"]
    report = export_model(final, tmp_path / "export", warmup=1, repeats=2)
    assert report["onnx"]["max_abs_diff"] < 1e-4 and report["torch_export"]["max_abs_diff"] < 1e-4
