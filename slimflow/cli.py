"""`slimflow` command line: one sub-command per pipeline stage; each is a thin call into a Python function."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

import slimflow


def _config(args, defaults: dict) -> dict:
    from slimflow.config import load_config

    return load_config(defaults, args.config, args.overrides, update=_flag_settings(args))


SETTING_FLAG = "setting:"  # argparse dest prefix of a flag that stands for a config setting
# `slimflow fid` flag -> (setting of slimflow.stages.fid.DEFAULTS, type): `--samples s.npz --n 300` is
# `samples=s.npz n_samples=300`; what each setting means: `slimflow fid --help-config`
FID_FLAGS: dict[str, tuple[str, type]] = {
    "protocol": ("protocol", str),
    "samples": ("samples", str),
    "n": ("n_samples", int),
    "method": ("sampling.method", str),
    "steps": ("sampling.steps", int),
    "seed": ("seed", int),
    "batch-size": ("batch_size", int),
    "reference": ("reference.name", str),
    "split": ("reference.split", str),
    "root": ("reference.root", str),
    "n-reference": ("reference.n", int),
    "image-size": ("reference.image_size", int),
    "stats": ("reference.stats", str),
    "extractor": ("extractor", str),
    "weights": ("weights", str),
    "save-stats": ("save_stats", str),
    "out": ("out", str),
}


def _add_setting_flags(parser: argparse.ArgumentParser, flags: dict[str, tuple[str, type]]) -> None:
    """`--flag VALUE` for each {flag: (setting, type)}: the same as the override `setting=VALUE`, applied after
    the overrides."""
    for flag, (key, kind) in flags.items():
        parser.add_argument(f"--{flag}", dest=SETTING_FLAG + key, type=kind, metavar="VALUE", help=f"sets {key}")


def _flag_settings(args) -> dict:
    """The nested settings of the setting flags given on the command line."""
    tree: dict = {}
    for dest, value in vars(args).items():
        if dest.startswith(SETTING_FLAG) and value is not None:
            *parents, leaf = dest.removeprefix(SETTING_FLAG).split(".")
            node = tree
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    return tree


def _with_config(parser: argparse.ArgumentParser, default: str | None = None) -> argparse.ArgumentParser:
    parser.add_argument(
        "--config", default=default, help="a YAML file, or an installed preset by name (default: %(default)s)"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the merged config (defaults <- preset <- overrides) and exit"
    )
    parser.add_argument(
        "--help-config",
        action="store_true",
        help="print every setting of the merged config with its value and what it means, and exit",
    )
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    return parser


def _stage(name: str):
    """The sub-command of the config stage `name` (slimflow.stages.CONFIG_STAGES): load the config against the
    stage's DEFAULTS, run it, print what it returns."""

    def run(args) -> None:
        from slimflow.stages import run_stage, stage

        module, fn = stage(name)
        cfg = _config(args, module.DEFAULTS)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(json.loads(json.dumps(cfg)), sort_keys=False), end="")
            return
        if args.help_config:
            from slimflow.config import describe_config

            print(describe_config(cfg, module.HELP), end="")
            return
        result = run_stage(fn, cfg, _command())
        # a stage with its own summary (fid's table) prints that; the others their result as JSON
        print(
            module.format_result(result)
            if hasattr(module, "format_result")
            else json.dumps(result, indent=1, default=str)
        )

    return run


def cmd_domain_net_train(args) -> None:
    from slimflow.stages.domain_net import train_domain_net

    print(
        json.dumps(
            train_domain_net(
                args.out,
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                seed=args.seed,
                data_root=args.data_root,
                widths=tuple(args.widths),
                depths=tuple(args.depths),
            ),
            indent=1,
            default=str,
        )
    )


def _int8_fid(args) -> dict | None:
    """export's FID-measure settings from --int8-fid-*, or None without --int8-fid-budget."""
    if args.int8_fid_budget is None:
        return None
    name, _, split = args.int8_fid_reference.partition(":")
    fid = {"reference": {"name": name, "split": split or "test"}, "n": args.int8_fid_samples}
    if args.int8_fid_extractor is not None:
        fid["extractor"] = args.int8_fid_extractor
    if args.int8_fid_weights is not None:
        fid["weights"] = args.int8_fid_weights
    return fid


def cmd_export(args) -> None:
    from slimflow.stages.export import INT8_OPS, export_model

    print(
        json.dumps(
            export_model(
                args.model,
                args.out,
                tuple(args.formats),
                resolution=args.resolution,
                unsafe_pickle=args.unsafe_pickle,
                int8=args.int8,
                calibration=args.calibration,
                calibration_seed=args.calibration_seed,
                int8_ops=tuple(args.int8_ops) if args.int8_ops else INT8_OPS,
                int8_exclude=tuple(args.int8_exclude),
                int8_budget=args.int8_budget,
                int8_fid_budget=args.int8_fid_budget,
                int8_fid=_int8_fid(args),
                int8_reduce_range=not args.int8_full_range,
            ),
            indent=1,
            default=str,
        )
    )


def cmd_teacher_info(args) -> None:
    from teachers.inspect import describe_checkpoint, format_summary

    print(format_summary(describe_checkpoint(args.path, unsafe_pickle=args.unsafe_pickle)))


def cmd_invert(args) -> None:
    from slimflow.stages.invert import invert_images

    result = invert_images(
        args.teacher,
        args.images,
        method=args.method,
        steps=args.steps,
        out_dir=args.out,
        n=args.n,
        split=args.split,
        nfe_per_direction=args.nfe,
        unsafe_pickle=args.unsafe_pickle,
        resolution=args.resolution,
    )
    print(json.dumps(result, indent=1))


def _key_values(pairs: list[str], what: str) -> dict:
    """["img_size=32", "patch_size=4"] -> {"img_size": 32, "patch_size": 4} (values parsed as YAML)."""
    from slimflow.config import ConfigError, parse_override

    out = {}
    for pair in pairs:
        tree = parse_override(pair)
        key, value = next(iter(tree.items()))
        if isinstance(value, dict):
            raise ConfigError(f"{what} {pair!r}: the name must not contain dots")
        out[key] = value
    return out


def prune_net_settings(args) -> dict:
    """prune_network's keyword arguments: its own defaults <- the --config preset <- the options given."""
    import inspect

    from pruning import prune_network
    from slimflow.config import ConfigError, load_yaml, resolve_config

    settings = {
        name: p.default
        for name, p in inspect.signature(prune_network).parameters.items()
        if p.default is not inspect.Parameter.empty and name not in ("load_images", "progress")
    }
    settings["out_dir"] = "runs/prune-net"
    if getattr(args, "config", None):
        path = resolve_config(args.config)
        preset = load_yaml(path)
        unknown = sorted(set(preset) - set(settings) - {"model"})
        if unknown:
            raise ConfigError(f"{path}: unknown prune-net settings {', '.join(unknown)} (known: {', '.join(settings)})")
        settings.update(preset)
    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config", "print_config")}
    if "model_kwargs" in given:
        given["model_kwargs"] = {
            **(settings.get("model_kwargs") or {}),
            **_key_values(given["model_kwargs"], "--model-kwargs"),
        }
    if "unwrapped_parameters" in given:
        given["unwrapped_parameters"] = _key_values(given["unwrapped_parameters"], "--unwrapped")
    settings.update(given)
    if not settings.get("model"):
        raise ConfigError("prune-net needs a model: --model NAME (or model: in the --config preset)")
    return settings


def cmd_prune_net(args) -> None:
    settings = prune_net_settings(args)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(settings, sort_keys=False), end="")
        return
    from pruning import prune_network
    from slimflow.checkpoint import require_writable
    from slimflow.data import load_images

    require_writable(settings["out_dir"])
    report = prune_network(load_images=load_images, **settings)
    print(json.dumps({k: report[k] for k in ("model", "method", "before", "after", "seconds")}, indent=1))


def cmd_sample(args) -> None:
    import torch

    from slimflow.checkpoint import require_writable
    from slimflow.images import save_grid, save_npz
    from slimflow.sample import sample
    from teachers.zoo import load_model

    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    for path in (args.out, args.npz):
        if path:
            require_writable(path, kind="file")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.model, device=device, resolution=args.resolution, unsafe_pickle=args.unsafe_pickle)
    label = args.label
    if label is not None and label != "balanced":
        try:
            label = int(label)
        except ValueError:
            raise ValueError(f"--label must be a class index or 'balanced', got {label!r}") from None
    images, nfe = sample(
        model,
        args.n,
        method=args.method,
        steps=args.steps,
        seed=args.seed,
        rtol=args.tol,
        atol=args.tol,
        progress=True,
        labels=label,
        guidance=args.guidance,
    )
    path = save_grid(images, args.out, nrow=args.nrow)
    print(f"wrote {path} ({args.n} samples, {args.method}, {nfe:.1f} NFE/sample)")
    if args.npz:
        print(f"wrote {save_npz(images, args.npz)}")


def _command() -> str:
    return "slimflow " + " ".join(shlex.quote(a) for a in sys.argv[1:])


UNSAFE_HELP = "allow unpickling code from a .pth/.pt file (only for files you trust)"


def _model_file_args(parser: argparse.ArgumentParser) -> None:
    """The options of a command that reads any model file (teachers.zoo.load_model)."""
    parser.add_argument("--resolution", type=int, default=None, help="needed for reference DDPM++ checkpoints")
    parser.add_argument("--unsafe-pickle", action="store_true", help=UNSAFE_HELP)


# (parent command or None, command, help, default preset, stage name in slimflow.stages.CONFIG_STAGES)
CONFIG_COMMANDS = [
    ("teacher", "train", "train a 1-rectified-flow teacher", "teacher/fmnist", "teacher"),
    ("pairs", "generate", "solve the teacher ODE for (noise seed, image) pairs", "pairs/fmnist", "pairs"),
    (
        None,
        "anneal",
        "annealing reflow: a small student from scratch on the pairs",
        "anneal/fmnist",
        "anneal",
    ),
    (None, "distill", "flow-guided distillation into a one-step student", "distill/fmnist", "distill"),
    (None, "run", "pairs -> anneal -> distill from one config", "quickstart", "run"),
    (
        None,
        "prune",
        "prune a flow student's channels, then recover it by distillation",
        "prune/fmnist",
        "prune",
    ),
    (None, "bench", "FID/KID/precision-recall vs params, MACs, NFE, latency", "bench/fmnist-cpu", "bench"),
    (None, "fid", "FID/KID/precision-recall of samples, a folder or a model vs a data set or statistics", None, "fid"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimflow", description=__doc__)
    parser.add_argument("--version", action="version", version=f"slimflow {slimflow.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    groups = {
        "teacher": sub.add_parser("teacher", help="train or inspect a teacher").add_subparsers(
            dest="action", required=True
        ),
        "pairs": sub.add_parser("pairs", help="reflow pairs from a teacher").add_subparsers(
            dest="action", required=True
        ),
    }
    for parent, name, text, preset, stage_name in CONFIG_COMMANDS:
        command = (groups[parent] if parent else sub).add_parser(name, help=text)
        _with_config(command, preset).set_defaults(func=_stage(stage_name))
        if stage_name == "fid":  # the one config stage with flags for its settings
            _add_setting_flags(command, FID_FLAGS)
    _add_file_commands(sub, groups["teacher"])
    _add_prune_net(sub)
    return parser


def _add_file_commands(sub, teacher) -> None:
    domain = sub.add_parser("domain-net", help="the Fashion-MNIST feature network").add_subparsers(
        dest="action", required=True
    )
    p = domain.add_parser("train", help="train the classifier behind FID (domain) and the domain perceptual loss")
    p.add_argument("--out", default="slimflow/assets/domain_net_fmnist.safetensors")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None)
    p.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2, 2, 1])
    p.set_defaults(func=cmd_domain_net_train)

    p = sub.add_parser("export", help="export a one-step student to ONNX / torch.export and check parity")
    p.add_argument("--model", required=True)
    p.add_argument("--out", default="runs/export")
    p.add_argument("--formats", nargs="+", default=["onnx", "torch_export"])
    p.add_argument("--int8", action="store_true", help="also generator.int8.onnx: static int8 quantization (QDQ)")
    p.add_argument("--calibration", type=int, default=64, help="int8: calibration noise samples (seed, 0..N-1)")
    p.add_argument("--calibration-seed", type=int, default=1, help="int8: seed of the calibration noise")
    p.add_argument("--int8-ops", nargs="+", default=None, help="int8: ONNX op types to quantize (Conv MatMul)")
    p.add_argument("--int8-exclude", nargs="*", default=[], help="int8: ONNX node names left in fp32")
    p.add_argument(
        "--int8-budget",
        type=float,
        default=None,
        help="int8: also a mixed-precision file (sensitivity scan per block) within this image RMSE to fp32",
    )
    p.add_argument(
        "--int8-fid-budget",
        type=float,
        default=None,
        help="int8: instead, a mixed-precision file within this relative FID increase over fp32 (0.05: +5%%)",
    )
    p.add_argument("--int8-fid-samples", type=int, default=1000, help="int8 FID budget: samples per FID")
    p.add_argument(
        "--int8-fid-reference", default="fashion_mnist:test", help="int8 FID budget: reference set NAME[:SPLIT]"
    )
    p.add_argument("--int8-fid-extractor", default=None, help="int8 FID budget: feature extractor (domain)")
    p.add_argument("--int8-fid-weights", default=None, help="int8 FID budget: the extractor's weights file")
    p.add_argument(
        "--int8-full-range",
        action="store_true",
        help="int8: 8-bit weights (default 7-bit: onnxruntime's uint8 x int8 kernels saturate on x86 without VNNI)",
    )
    _model_file_args(p)
    p.set_defaults(func=cmd_export)

    p = teacher.add_parser("info", help="say what a checkpoint is (format, architecture, params, time convention)")
    p.add_argument("path")
    p.add_argument("--unsafe-pickle", action="store_true", help=UNSAFE_HELP)
    p.set_defaults(func=cmd_teacher_info)

    p = sub.add_parser("invert", help="map images to noise and back (RF-Solver vs Euler reconstruction error)")
    p.add_argument("--teacher", required=True, help="teacher file: project model, reference .pth, diffusers folder")
    p.add_argument("--images", default="fashion_mnist", help="a folder of images or a data set name")
    p.add_argument("--split", default="test")
    p.add_argument("--method", default="rf_solver")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--nfe", type=int, nargs="+", default=[4, 8, 16, 32], help="NFE per direction to compare")
    _model_file_args(p)
    p.add_argument("--out", default="runs/invert")
    p.set_defaults(func=cmd_invert)

    p = sub.add_parser("sample", help="write an image grid (and .npz) sampled from a model file")
    p.add_argument(
        "--model",
        required=True,
        help="any model file slimflow pairs accepts: exported .safetensors, "
        "a run/checkpoint directory, a reference DDPM++ .pth (with --resolution), a diffusers folder",
    )
    p.add_argument("--method", default="euler", help="euler | heun | midpoint | rf_solver | dopri5")
    p.add_argument("--steps", type=int, default=1, help="solver steps (ignored by dopri5)")
    p.add_argument("--tol", type=float, default=1e-5, help="rtol = atol of dopri5")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--nrow", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png")
    p.add_argument("--npz", default=None, help="also write the samples as uint8 NHWC .npz")
    p.add_argument(
        "--label",
        default=None,
        help="class-conditional model: a class index for every sample, or 'balanced' (the default: sample i is of "
        "class i mod the class count)",
    )
    p.add_argument(
        "--guidance", type=float, default=1.0, help="class-conditional model: classifier-free guidance scale (1: none)"
    )
    _model_file_args(p)
    p.set_defaults(func=cmd_sample)


def _add_prune_net(sub) -> None:
    # options left out of the command line keep the --config preset's value, else prune_network's default
    # (see them all with --print-config)
    p = sub.add_parser(
        "prune-net",
        help="prune an existing network (timm, torchvision or your own nn.Module) and fine-tune it",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", default=None, help="a YAML of these settings (names with _), or a preset by name")
    p.add_argument("--print-config", action="store_true", default=False, help="print the merged settings and exit")
    p.add_argument("--model", help="timm:<name>, torchvision:<name>, package.module:Class or path/to/file.py:Class")
    p.add_argument(
        "--model-kwargs", nargs="+", metavar="KEY=VALUE", help="constructor arguments, e.g. img_size=32 patch_size=4"
    )
    p.add_argument("--checkpoint", help="your weights for that architecture (.safetensors or .pt)")
    p.add_argument("--pretrained", help="path of locally available pretrained weights")
    p.add_argument("--random-init", action="store_true", help="prune randomly initialised weights on purpose")
    p.add_argument("--dataset", help="fashion_mnist | cifar10 | image_folder")
    p.add_argument("--data-root")
    p.add_argument("--image-size", type=int)
    p.add_argument("--num-classes", type=int)
    p.add_argument(
        "--method", help="structural: l1 l2 taylor lamp random; unstructured: magnitude ap; semi-structured: 2:4"
    )
    p.add_argument("--ratio", type=float, help="structural: share of channels removed")
    p.add_argument("--head-ratio", type=float, help="structural: share of attention heads removed (needs --ratio > 0)")
    p.add_argument(
        "--keep-head-dims", action="store_false", dest="prune_head_dims", help="attention keeps its head size"
    )
    p.add_argument(
        "--unwrapped",
        dest="unwrapped_parameters",
        nargs="+",
        metavar="NAME=DIM",
        help="channel dimension of a parameter outside layers (default: its last dimension of size > 1)",
    )
    p.add_argument("--sparsity", type=float, help="unstructured: final share of zero weights")
    p.add_argument("--steps", type=int, help="pruning steps (structural) or cycles (unstructured)")
    p.add_argument("--global-pruning", action="store_true")
    p.add_argument("--round-to", type=int)
    p.add_argument("--ap-fraction", type=float)
    p.add_argument("--finetune-epochs", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--max-train-images", type=int)
    p.add_argument("--max-eval-images", type=int)
    p.add_argument("--latency-batch-size", type=int, help="batch of the second latency measurement (0: batch 1 only)")
    p.add_argument("--device")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", dest="out_dir", help="output folder (default runs/prune-net)")
    p.set_defaults(func=cmd_prune_net)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from slimflow.checkpoint import CheckpointError
    from slimflow.config import ConfigError
    from slimflow.engine import NonFiniteLossError
    from slimflow.pairs import PairStoreError

    try:
        args.func(args)
    except (
        ConfigError,
        CheckpointError,
        PairStoreError,
        NonFiniteLossError,
        OSError,  # a missing file, a full or read-only disk
        ValueError,
        ImportError,
    ) as err:
        sys.exit(f"slimflow {args.command}: error: {err}")
    except KeyboardInterrupt as err:
        sys.exit(f"slimflow {args.command}: {str(err) or 'interrupted'}")


if __name__ == "__main__":
    main()
