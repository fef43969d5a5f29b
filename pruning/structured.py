"""Structural (channel) pruning on Torch-Pruning's `BasePruner`.

Channels are removed for real, so params, MACs and latency drop. Output layers are found by tracing a forward
pass and never pruned. timm-style attention (`.qkv` Linear + `.num_heads`) gets its head count passed in; it loses
head dimensions (`prune_head_dims`) and, with `head_ratio` > 0, whole heads. After every step the modules' width
attributes are brought back in line with their weights (`num_heads`, `head_dim`, `attn_dim` of attention; `embed_dim`,
`num_features`, `head_hidden_size` of a network, see `WidthAttributes`), so code reading them (timm's
`reset_classifier`, `forward_head`) sees the pruned widths.

Parameters that sit on no layer Torch-Pruning knows (a ViT's `cls_token` and `pos_embed`) are found before tracing
and passed to it explicitly with the dimension that holds their channels (`find_unwrapped_parameters`); they are
pruned with the channels they are added to.

GroupNorm, two ways (`groupnorm=`), each also with "+regroup" (below):
- "even" (the default): channels are removed evenly from every group, so `num_channels % num_groups == 0` holds
  and the group count stays. The group count is taken per pruning group from the channels it covers in each
  GroupNorm, so a GroupNorm fed by a concat (UNet skip connections) splits its groups between the concatenated
  producers (Torch-Pruning 1.6 would use the GroupNorm's whole group count and fail). The per-group count rounds
  up: layers coupled to a GroupNorm lose at least one channel per group (ratio 0.1 on GroupNorm(32, 128) removes
  32, ratio 0.3 on 4 channels per group removes 2 of them), so with 4 channels per group widths move in quarters.
- "whole_groups": whole groups are removed (ranked by their mean channel importance) and `num_groups` drops with
  them; the surviving groups keep their channels and so normalise exactly as before. Widths move in steps of one
  group (4 channels in a DDPM++ UNet), fine enough to hit a MACs budget. Local ranking only. With `round_to` each
  layer removes a multiple of it (so widths that are multiples of it stay so). After the steps, `remove_block`
  removes one more block from the layer keeping the largest share of its width: per-layer widths for a MACs budget
  (`plan_for_macs`), where one ratio for all layers moves them together and can miss it.
Both refuse a GroupNorm whose groups straddle a concat: fed by a producer whose channel count or offset in the
concat is not a multiple of the group size (DDPM++ from 128 channels on: 256 + 128 channels into 32 groups of 12),
so no removals from the producers can keep every group whole or even. "even+regroup" and "whole_groups+regroup"
prune such a GroupNorm like any normalisation layer (its channels follow each producer's own pruning; the other
GroupNorms are handled as in the base mode) and then re-choose its group count (`regroup_count`): the largest
divisor of its new channel count not above its original group count. That keeps the count wherever it still
divides and never fails (DDPM++'s min(C/4, 32) rule would fail on counts it does not divide). With whole_groups
each producer also removes a multiple of the GroupNorm's group count (`straddled_multiple`; per producer, so its
widths then move in steps of 32 channels in a DDPM++ UNet), which keeps the count itself: a DDPM++ GroupNorm keeps
its 32 groups. With even the producers are not held to that, so the count can drop (192 -> 144 channels: 32 -> 24
groups). Either way the groups now gather other channels than before, so the GroupNorm no longer normalises the
surviving channels exactly as before: the report lists every regrouped GroupNorm that lost channels
(`regrouped_groupnorms`: channels and groups, original and now), and recovery training is expected to absorb the
change. The group counts are saved with the width attributes, so a reloaded model is rebuilt exactly. Models
without straddling GroupNorms prune identically with or without "+regroup".

Each step replaces the Parameter objects of pruned layers: anything holding parameters (optimizer, scheduler,
EMA copy) must be rebuilt after `StructuredPruner.step()` / in the `after_step` callback of `prune_structured`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from .measure import as_args, count_macs_params

IMPORTANCES = ("l1", "l2", "taylor", "lamp", "random")


def make_importance(name: str) -> tp.importance.Importance:
    """Torch-Pruning importance for a name in IMPORTANCES."""
    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "lamp":
        return tp.importance.LAMPImportance(p=2)
    if name == "random":
        return tp.importance.RandomImportance()
    raise ValueError(f"unknown importance {name!r}: choose one of {', '.join(IMPORTANCES)}")


WIDTH_ATTRIBUTES = (
    "num_heads",
    "head_dim",
    "attn_dim",
    "embed_dim",
    "num_features",
    "head_hidden_size",
    "num_groups",  # GroupNorm: "whole_groups" pruning and "+regroup" change it
)
GROUPNORM_MODES = ("even", "whole_groups", "even+regroup", "whole_groups+regroup")
NETWORK_WIDTHS = ("embed_dim", "num_features", "head_hidden_size")  # widths kept in step by WidthAttributes


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ValueError(
        f"cannot find the output layers of a model returning {type(output).__name__}; "
        f"pass them explicitly as output_layers"
    )


@torch.no_grad()
def _traced_layers(model: nn.Module, example_inputs: Any) -> tuple[list[nn.Module], torch.Tensor]:
    """The Linear/Conv layers in the order one eval-mode forward pass calls them, and the output tensor."""
    calls: list[nn.Module] = []
    handles = [
        m.register_forward_hook(lambda mod, _i, _o: calls.append(mod))
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
    ]
    was_training = model.training
    model.eval()
    try:
        out = _first_tensor(model(*as_args(example_inputs)))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return calls, out


def find_output_layers(model: nn.Module, example_inputs: Any) -> list[nn.Module]:
    """The layer producing the model's output, found by tracing one eval-mode forward pass.

    Classifier head: the last Linear whose out_features equals the output's last dimension (number of classes).
    Output conv: the last convolution whose out_channels equals the output's channel dimension (dim 1).
    """
    calls, out = _traced_layers(model, example_inputs)
    for module in reversed(calls):
        if isinstance(module, nn.Linear) and module.out_features == out.shape[-1]:
            return [module]
        if isinstance(module, nn.modules.conv._ConvNd) and out.ndim >= 3 and module.out_channels == out.shape[1]:
            return [module]
    raise ValueError(
        f"no Linear/Conv layer produces the model's output of shape {tuple(out.shape)}; "
        f"pass the output layers explicitly as output_layers"
    )


def _attention_modules(model: nn.Module) -> dict[nn.Module, nn.Module]:
    """{qkv Linear: its attention module} for timm-style attention."""
    return {
        m.qkv: m
        for m in model.modules()
        if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int)
    }


def _layer_width(layer: nn.Module, side: str) -> int:
    if isinstance(layer, nn.Linear):
        return layer.in_features if side == "in" else layer.out_features
    return layer.in_channels if side == "in" else layer.out_channels


def _int_attr(module: nn.Module, attr: str) -> int | None:
    value = getattr(module, attr, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class WidthAttributes:
    """Keeps a network's integer width attributes (`embed_dim`, `num_features`, `head_hidden_size`) equal to the
    layers they describe while channels are removed.

    Each attribute is tied, before pruning, to the first of these layers inside its module whose width equals it:
    for `num_features` and `head_hidden_size`, the input of the output layer (the classifier reads the features),
    then the output of the first layer called; for `embed_dim` the other way round (a ViT's patch embedding sets
    the residual width). An attribute that matches neither is left alone and listed in `unmatched`.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, output_layers: Sequence[nn.Module]):
        self.ties: list[tuple[nn.Module, str, nn.Module, str]] = []
        self.unmatched: list[str] = []
        owners = [  # modules with a width attribute (Torch-Pruning updates MultiheadAttention itself)
            (name, module)
            for name, module in model.named_modules()
            if not isinstance(module, nn.MultiheadAttention) and any(_int_attr(module, a) for a in NETWORK_WIDTHS)
        ]
        if not owners:  # e.g. the project's UNet: no second forward pass to trace
            return
        calls, _ = _traced_layers(model, example_inputs)
        for name, module in owners:
            inside = {id(m) for m in module.modules()}
            first = next((m for m in calls if id(m) in inside), None)
            heads = [m for m in output_layers if id(m) in inside]
            for attr in NETWORK_WIDTHS:
                value = _int_attr(module, attr)
                if value is None:
                    continue
                candidates = [(m, "in") for m in heads] + ([(first, "out")] if first is not None else [])
                if attr == "embed_dim":
                    candidates.reverse()
                tie = next(((m, side) for m, side in candidates if _layer_width(m, side) == value), None)
                if tie is None:
                    self.unmatched.append(f"{name or type(module).__name__}.{attr}")
                else:
                    self.ties.append((module, attr, *tie))

    def sync(self) -> None:
        for module, attr, layer, side in self.ties:
            setattr(module, attr, _layer_width(layer, side))


def width_attributes(model: nn.Module) -> dict[str, dict[str, int]]:
    """{module name: {attribute: value}} of the integer width attributes in WIDTH_ATTRIBUTES (saved with a pruned
    model and set again when it is rebuilt: a replayed history removes channels but does not know head counts)."""
    found = {}
    for name, module in model.named_modules():
        attrs = {a: v for a in WIDTH_ATTRIBUTES if (v := _int_attr(module, a)) is not None}
        if attrs:
            found[name] = attrs
    return found


def set_width_attributes(model: nn.Module, attributes: dict[str, dict[str, int]]) -> None:
    """Set the attributes recorded by `width_attributes` (names must exist in `model`)."""
    modules = dict(model.named_modules())
    for name, attrs in attributes.items():
        if name not in modules:
            raise ValueError(f"the model has no module {name!r} to set {', '.join(attrs)} on")
        for attr, value in attrs.items():
            setattr(modules[name], attr, int(value))


def find_unwrapped_parameters(
    model: nn.Module, *, custom_pruners: dict | None = None, dims: dict[str, int] | None = None
) -> dict[str, int]:
    """{parameter name: channel dimension} of parameters on no layer Torch-Pruning knows how to prune (a ViT's
    `cls_token`, `pos_embed`). The dimension is `dims[name]` where given, else the last one of size > 1 (Torch-
    Pruning's own guess, made explicit so that it is recorded and no warning is printed). Parameters without a
    dimension of size > 1 are left out (they hold no channels)."""
    known = tp.pruner.function.PrunerBox
    custom = custom_pruners or {}
    wrapped = set()
    for m in model.modules():
        kind = tp.ops.module2type(m)
        if (kind in known and kind != tp.ops.OPTYPE.ELEMENTWISE) or type(m) in custom or m in custom:
            wrapped.update(id(p) for p in m.parameters())
    given = dict(dims or {})
    found: dict[str, int] = {}
    for name, p in model.named_parameters():
        if id(p) in wrapped:
            continue
        if name in given:
            dim = given.pop(name)
            if not -p.ndim <= dim < p.ndim:
                raise ValueError(f"unwrapped parameter {name} has {p.ndim} dimensions, cannot prune dimension {dim}")
            found[name] = dim % p.ndim
        elif any(size > 1 for size in p.shape):
            found[name] = max(i for i, size in enumerate(p.shape) if size > 1)
    if given:
        raise ValueError(
            f"{', '.join(given)} {'is not an unwrapped parameter' if len(given) == 1 else 'are not unwrapped parameters'}"
            f" of the model (unwrapped: {', '.join(found) or 'none'})"
        )
    return found


def torch_pruning_unwrapped(model: nn.Module, dims: dict[str, int]) -> list[tuple[nn.Parameter, int]]:
    params = dict(model.named_parameters())
    return [(params[name], dim) for name, dim in dims.items()]


def sync_attention_dims(model: nn.Module) -> None:
    """Refresh `head_dim` (and `attn_dim`) of timm-style attention after its qkv projection lost channels.

    Heads keep their number and lose dimensions; `scale` is left as it was (as in Torch-Pruning's examples).
    """
    for m in model.modules():
        if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "head_dim", None), int):
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
            if isinstance(getattr(m, "attn_dim", None), int):
                m.attn_dim = m.num_heads * m.head_dim


def _missing_gradients(model: nn.Module) -> list[str]:
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m.weight.requires_grad and m.weight.grad is None
    ]


def _straddles(group, item, per_group: int) -> bool:
    """Whether the root layer of a pruning group covers the groups of the GroupNorm its `item` reaches only in part:
    its channel count is not a multiple of the group size, or its channels enter at an offset that is not (the
    second producer of a concat), so its last or first group also holds another producer's channels."""
    roots = item.root_idxs if item.root_idxs is not None else item.idxs
    return len(group[0].idxs) % per_group != 0 or any((i - r) % per_group for i, r in zip(item.idxs, roots))


def straddled_multiple(root_channels: int, norm: nn.GroupNorm) -> int:
    """How many channels a layer of `root_channels` channels feeding the straddled GroupNorm `norm` removes a
    multiple of ("whole_groups+regroup"): its group count where that divides the layer's width (as in DDPM++), so
    the GroupNorm's width stays a multiple of its group count and the count is kept; else the largest common
    divisor."""
    return math.gcd(root_channels, norm.num_groups)


def regroup_count(channels: int, max_groups: int) -> int:
    """The group count a regrouped GroupNorm of `channels` channels gets: the largest divisor of `channels` not above
    `max_groups` (its original group count)."""
    return max(g for g in range(1, min(channels, max_groups) + 1) if channels % g == 0)


class _GroupNormAwarePruner(tp.pruner.BasePruner):
    """BasePruner whose channel-group count for a GroupNorm is counted in the root layer's channels.

    regroup: GroupNorms whose groups a pruning group straddles are left out of its channel-group count and collected
    in `straddling` (StructuredPruner regroups them after the step) instead of refused.
    """

    def __init__(self, *args, regroup: bool = False, **kwargs):
        self.concat_fed_groupnorm = False  # set while the base class counts channel groups
        self.regroup = regroup
        self.straddling: set[nn.GroupNorm] = set()
        super().__init__(*args, **kwargs)

    def straddled(self, norm: nn.GroupNorm, group, consequence: str) -> None:
        """Note that `group` straddles the groups of `norm`: collect it when regrouping, else refuse."""
        if not self.regroup:
            raise ValueError(
                f"GroupNorm {self.DG._module2name[norm]} ({norm.num_groups} groups of "
                f"{norm.num_channels // norm.num_groups}) receives channels of "
                f"{self.DG._module2name[group[0].dep.target.module]} that straddle its groups, so {consequence}: "
                "put that layer in ignored_layers, or regroup such GroupNorms (groupnorm='even+regroup' or "
                "'whole_groups+regroup')"
            )
        self.straddling.add(norm)

    def _get_channel_groups(self, group) -> int:
        root_channels = len(group[0].idxs)
        counts = []
        for item in group:
            module = item.dep.target.module
            if isinstance(module, nn.GroupNorm):
                per_group = module.num_channels // module.num_groups
                self.concat_fed_groupnorm |= len(set(item.idxs)) < module.num_channels
                if _straddles(group, item, per_group):
                    self.straddled(module, group, "they cannot be pruned evenly")
                    continue
                counts.append(root_channels // per_group)
            else:
                is_out = self.DG.is_out_channel_pruning_fn(item.dep.handler)
                groups = self.out_channel_groups if is_out else self.in_channel_groups
                if module in groups:
                    counts.append(groups[module])
        return math.lcm(*counts) if counts else 1


def _check_groupnorms(model: nn.Module) -> None:
    broken = [
        f"{name} ({m.num_channels} channels, {m.num_groups} groups)"
        for name, m in model.named_modules()
        if isinstance(m, nn.GroupNorm) and m.num_channels % m.num_groups
    ]
    if broken:
        raise RuntimeError(
            f"pruning left GroupNorm layers invalid: {', '.join(broken)}; a concat fed them channels "
            f"pruned at different rates (an ignored producer?). Prune locally or ignore the concat's "
            f"producers together"
        )


class MatmulPruner(tp.pruner.BasePruningFunc):
    """Torch-Pruning pruner for layers computing `x @ W + b` with W stored (in, out), e.g. the NIN layers of
    DDPM++ attention. Pass it as `custom_pruners={LayerClass: MatmulPruner("W", "b")}`."""

    def __init__(self, weight: str = "W", bias: str | None = "b"):
        super().__init__()
        self.weight, self.bias = weight, bias

    def _keep(self, size: int, idxs) -> list[int]:
        return sorted(set(range(size)) - set(idxs))

    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        keep = self._keep(self.get_out_channels(layer), idxs)
        setattr(layer, self.weight, self._prune_parameter_and_grad(getattr(layer, self.weight), keep, 1))
        if self.bias is not None:
            setattr(layer, self.bias, self._prune_parameter_and_grad(getattr(layer, self.bias), keep, 0))
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs) -> nn.Module:
        keep = self._keep(self.get_in_channels(layer), idxs)
        setattr(layer, self.weight, self._prune_parameter_and_grad(getattr(layer, self.weight), keep, 0))
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return getattr(layer, self.weight).shape[1]

    def get_in_channels(self, layer: nn.Module) -> int:
        return getattr(layer, self.weight).shape[0]


@dataclass
class StepReport:
    step: int
    ratio: float
    macs: int
    params: int


def resolve_layers(model: nn.Module, layers: Sequence[nn.Module | str]) -> list[nn.Module]:
    """`layers` as modules of `model`: modules stay, names (as in `model.named_modules()`) are looked up."""
    by_name = dict(model.named_modules())
    unknown = [x for x in layers if isinstance(x, str) and x not in by_name]
    if unknown:
        raise ValueError(f"no module named {', '.join(map(repr, unknown))} in {type(model).__name__}")
    return [by_name[x] if isinstance(x, str) else x for x in layers]


class StructuredPruner:
    """Iterative channel pruning: `ratio` is the channel ratio vs the original width reached after `steps` steps.

    importance: one of IMPORTANCES ("taylor" reads `.grad`: run a backward first, e.g. `accumulate_gradients`).
    global_pruning ranks channels across layers; round_to keeps channel counts multiples of it (Torch-Pruning;
    with groupnorm "whole_groups": removals are multiples of it, and refused with GroupNorm in "even" mode);
    ignored_layers (modules of `model`, or their names, which also hold on deep copies) are kept whole in addition
    to the traced output layers (or instead, if output_layers is given);
    custom_pruners ({layer class or instance: tp BasePruningFunc}, e.g. MatmulPruner) handle layers Torch-Pruning
    does not know; pass the same to `load_pruned`. Layers it only knows this way are pruned along with their
    neighbours but not scored (importances score Conv/Linear/norm weights).
    head_ratio: share of attention heads removed (whole heads of timm-style attention, rounded up per layer; needs
    ratio > 0); prune_head_dims: whether attention also loses dimensions inside its heads (at `ratio`). unwrapped_parameters: {name: dim} for
    parameters on no known layer, overriding the guess of `find_unwrapped_parameters`. groupnorm: one of
    GROUPNORM_MODES (module docstring); `regrouped_groupnorms()` lists what "+regroup" regrouped.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        *,
        importance: str = "l2",
        ratio: float = 0.5,
        steps: int = 1,
        global_pruning: bool = False,
        round_to: int | None = None,
        ignored_layers: Sequence[nn.Module | str] = (),
        output_layers: Sequence[nn.Module] | None = None,
        custom_pruners: dict | None = None,
        head_ratio: float = 0.0,
        prune_head_dims: bool = True,
        unwrapped_parameters: dict[str, int] | None = None,
        groupnorm: str = "even",
    ):
        if groupnorm not in GROUPNORM_MODES:
            raise ValueError(f"groupnorm must be one of {', '.join(GROUPNORM_MODES)}, got {groupnorm!r}")
        groupnorm, _, straddling = groupnorm.partition("+")
        if groupnorm == "whole_groups" and (global_pruning or head_ratio > 0):
            raise ValueError("groupnorm='whole_groups' ranks per layer: no global_pruning or head_ratio")
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio is the share of channels to remove and must be in [0, 1), got {ratio}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not 0.0 <= head_ratio < 1.0:
            raise ValueError(f"head_ratio is the share of attention heads to remove, in [0, 1), got {head_ratio}")
        if head_ratio > 0 and ratio == 0:
            raise ValueError(
                "Torch-Pruning removes heads only in steps that also remove channels: set ratio > 0 (with "
                "prune_head_dims=False attention keeps its head size and only the other layers lose channels)"
            )
        self.attention = _attention_modules(model)
        if head_ratio > 0 and not self.attention:
            raise ValueError(
                "head_ratio > 0 but the model has no timm-style attention (a `.qkv` Linear and `.num_heads`)"
            )
        if round_to is not None and round_to < 1:
            raise ValueError(f"round_to must be a positive channel multiple, got {round_to}")
        if round_to is not None and groupnorm == "even" and any(isinstance(m, nn.GroupNorm) for m in model.modules()):
            raise ValueError(
                "round_to cannot be combined with GroupNorm in groupnorm='even' mode: Torch-Pruning 1.6 then prunes "
                "nothing. Use groupnorm='whole_groups' (it removes multiples of round_to channels) or leave it unset"
            )
        self.model = model
        self.example_inputs = as_args(example_inputs)
        self.importance = importance
        self.groupnorm = groupnorm  # the base mode, without "+regroup"
        self.steps = steps
        self.round_to = round_to
        self.extra_blocks = 0  # removed by `remove_block` after the steps
        self.initial_groupnorms = {
            m: (name, m.num_channels, m.num_groups) for name, m in model.named_modules() if isinstance(m, nn.GroupNorm)
        }
        self.regrouped: set[nn.GroupNorm] = set()
        self.output_layers = (
            list(output_layers) if output_layers is not None else find_output_layers(model, example_inputs)
        )
        self.unwrapped = find_unwrapped_parameters(model, custom_pruners=custom_pruners, dims=unwrapped_parameters)
        self.widths = WidthAttributes(model, example_inputs, self.output_layers)
        was_training = model.training
        self.pruner = _GroupNormAwarePruner(
            model,
            self.example_inputs,
            importance=make_importance(importance),
            pruning_ratio=ratio,
            iterative_steps=steps,
            global_pruning=global_pruning,
            round_to=round_to if groupnorm == "even" else None,
            ignored_layers=[*self.output_layers, *resolve_layers(model, ignored_layers)],
            num_heads={qkv: m.num_heads for qkv, m in self.attention.items()},
            prune_num_heads=head_ratio > 0,
            head_pruning_ratio=head_ratio,
            prune_head_dims=prune_head_dims,
            customized_pruners=custom_pruners,
            unwrapped_parameters=torch_pruning_unwrapped(model, self.unwrapped),
            regroup=straddling == "regroup",
        )
        model.train(was_training)  # tracing leaves the model in eval()
        self.initial_width = {m: _layer_width(m, "out") for m in model.modules() if isinstance(m, _ROOTS)}
        if global_pruning and self.pruner.concat_fed_groupnorm:
            raise ValueError(
                "global pruning would remove different shares of a concat's inputs and break the "
                "GroupNorm after it; use local pruning (global_pruning=False) for this model"
            )

    @property
    def current_step(self) -> int:
        return self.pruner.current_step

    def history(self) -> list[list]:
        """Torch-Pruning's pruning history: [module name, is out-channel pruning, indices] per pruned group."""
        return [[name, bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in self.pruner.pruning_history()]

    def step(self) -> StepReport:
        """Prune one step; the pruned layers hold new Parameter objects afterwards (rebuild optimizers)."""
        if self.current_step >= self.steps:
            raise RuntimeError(f"all {self.steps} pruning steps are done")
        if self.importance == "taylor":
            missing = _missing_gradients(self.model)
            if missing:
                raise ValueError(
                    "taylor importance needs gradients, but .grad is empty for "
                    f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}: run loss.backward() on a "
                    "training loss before each step, e.g. pruning.accumulate_gradients(model, loss_fn, batches), "
                    "or pass compute_gradients to prune_structured"
                )
        was_training = self.model.training
        self.pruner.straddling.clear()
        if self.groupnorm == "whole_groups":
            self._remove_whole_groups()
        else:
            self.pruner.step()
        self._after_removal(was_training)
        macs, params = count_macs_params(self.model, self.example_inputs)
        ratio = float(self.pruner.per_step_pruning_ratio[self.current_step])
        return StepReport(step=self.current_step, ratio=ratio, macs=macs, params=params)

    def _after_removal(self, was_training: bool) -> None:
        """Bring group counts, head counts and width attributes in line with the weights after channels left."""
        self._regroup_straddled()
        _check_groupnorms(self.model)
        for qkv, attention in self.attention.items():
            attention.num_heads = self.pruner.num_heads[qkv]
        sync_attention_dims(self.model)
        self.widths.sync()
        self.model.train(was_training)

    def remove_block(self) -> bool:
        """Per-layer width refinement ("whole_groups" modes, after the steps): remove one more block from the one
        pruning group that keeps the largest share of its original width (ties: the first in the dependency
        graph's order). A block is the smallest removal the mode allows there: one group of every GroupNorm the
        pruning group reaches (the lcm of their group sizes; one channel without GroupNorm), or as many of them
        as the straddled GroupNorms ("+regroup") and round_to need; its blocks are ranked by mean importance, as
        the steps rank them. A group must keep at least one block. The choice depends on the widths alone, so
        which group loses channels (and so the MACs) is the same under any importance. Returns False, changing
        nothing, when no group can lose a block. The removal is recorded in the history like a step's."""
        if self.groupnorm != "whole_groups":
            raise ValueError("per-layer refinement removes whole groups: use groupnorm='whole_groups' (+regroup)")
        if self.current_step < self.steps:
            raise RuntimeError(f"remove blocks after the {self.steps} pruning steps, not before")
        pruner, graph = self.pruner, self.pruner.DG
        was_training = self.model.training
        candidates = []
        for order, group in enumerate(
            graph.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=_ROOTS)
        ):
            root, handler = group[0].dep.target.module, group[0].dep.handler
            if not graph.is_out_channel_pruning_fn(handler) or root not in self.initial_width:
                continue
            width = _layer_width(root, "out")
            block, _norms, multiple = self._group_block(group, width)
            removal = math.lcm(block, multiple)
            if width % block or width - removal < block:
                continue
            candidates.append((-width / self.initial_width[root], order, group, width, block, removal))
        self.pruner.straddling.clear()  # only the chosen group's straddled GroupNorms are regrouped
        for *_, group, width, block, removal in sorted(candidates, key=lambda c: c[:2]):
            imp = pruner.estimate_importance(group)
            if imp is None:
                continue
            _block, norms, _multiple = self._group_block(group, width)
            order = torch.argsort(imp.view(width // block, block).mean(dim=1).cpu(), stable=True)[: removal // block]
            idxs = sorted(int(b) * block + j for b in order for j in range(block))
            graph.get_pruning_group(group[0].dep.target.module, group[0].dep.handler, idxs).prune()
            for norm, per_group in norms:
                norm.num_groups = norm.num_channels // per_group
            self._after_removal(was_training)
            self.extra_blocks += 1
            return True
        return False

    def _regroup_straddled(self) -> None:
        """Give each GroupNorm straddled in this step `regroup_count` groups of its channels now."""
        for norm in self.pruner.straddling:
            _name, _channels, groups = self.initial_groupnorms[norm]
            norm.num_groups = regroup_count(norm.num_channels, groups)
            self.regrouped.add(norm)

    def regrouped_groupnorms(self) -> dict[str, dict[str, list[int]]]:
        """{name: {"channels": [original, now], "groups": [original, now]}} of the GroupNorms that were regrouped
        and lost channels (those whose groups no longer hold the same channels)."""
        found = {}
        for norm, (name, channels, groups) in self.initial_groupnorms.items():
            if norm in self.regrouped and norm.num_channels != channels:
                found[name] = {"channels": [channels, norm.num_channels], "groups": [groups, norm.num_groups]}
        return found

    def _remove_whole_groups(self) -> None:
        """One step of "whole_groups" pruning: per pruning group, remove the lowest-ranked blocks of channels that
        make whole GroupNorm groups, down to the step's share of the layer's original width."""
        pruner, graph = self.pruner, self.pruner.DG
        ratio = float(pruner.per_step_pruning_ratio[pruner.current_step + 1])
        plans = []
        for group in graph.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=_ROOTS):
            root, handler = group[0].dep.target.module, group[0].dep.handler
            if not graph.is_out_channel_pruning_fn(handler) or root not in self.initial_width:
                continue
            width = _layer_width(root, "out")
            block, norms, multiple = self._group_block(group, width)
            imp = pruner.estimate_importance(group)
            if imp is None or width % block:
                continue
            keep = max(block, block * round(self.initial_width[root] * (1.0 - ratio) / block))
            blocks_per_multiple = math.lcm(block, multiple) // block
            n_blocks = (width - keep) // block // blocks_per_multiple * blocks_per_multiple
            if n_blocks <= 0:
                continue
            order = torch.argsort(imp.view(width // block, block).mean(dim=1).cpu(), stable=True)[:n_blocks]
            idxs = sorted(int(b) * block + j for b in order for j in range(block))
            plans.append((root, handler, idxs, norms))
        for root, handler, idxs, norms in plans:
            graph.get_pruning_group(root, handler, idxs).prune()
            for norm, per_group in norms:
                norm.num_groups = norm.num_channels // per_group
        pruner.current_step += 1

    def _group_block(self, group, width: int) -> tuple[int, list[tuple[nn.GroupNorm, int]], int]:
        """Channels (in the root layer's numbering) that make whole groups of every GroupNorm the pruning group
        reaches, those GroupNorms with their channels per group, and the number of channels the removal must be a
        multiple of for the straddled ones ("+regroup": `straddled_multiple`)."""
        norms, sizes, multiples = [], [], []
        for item in group:
            module = item.dep.target.module
            if isinstance(module, nn.GroupNorm):
                per_group = module.num_channels // module.num_groups
                if _straddles(group, item, per_group):
                    self.pruner.straddled(module, group, "whole groups cannot be removed")
                    multiples.append(straddled_multiple(width, module))
                    continue
                norms.append((module, per_group))
                sizes.append(per_group)
        return (math.lcm(*sizes) if sizes else 1), norms, math.lcm(*multiples, self.round_to or 1)


_ROOTS = (nn.modules.conv._ConvNd, nn.Linear)


def prune_structured(
    model: nn.Module,
    example_inputs: Any,
    *,
    importance: str = "l2",
    ratio: float = 0.5,
    steps: int = 1,
    global_pruning: bool = False,
    round_to: int | None = None,
    ignored_layers: Sequence[nn.Module | str] = (),
    output_layers: Sequence[nn.Module] | None = None,
    custom_pruners: dict | None = None,
    head_ratio: float = 0.0,
    prune_head_dims: bool = True,
    unwrapped_parameters: dict[str, int] | None = None,
    groupnorm: str = "even",
    compute_gradients: Callable[[nn.Module], Any] | None = None,
    after_step: Callable[[nn.Module, StepReport], None] | None = None,
    extra_blocks: int = 0,
) -> dict:
    """Prune `model` in place over `steps` steps; returns a JSON-able report with MACs/params and the history.

    compute_gradients(model) runs before every step (fill .grad for "taylor", e.g. with accumulate_gradients);
    after_step(model, report) runs after every step: fine-tune there, with an optimizer built inside it.
    extra_blocks: after the last step, remove this many more blocks one at a time (`StructuredPruner.remove_block`,
    "whole_groups" modes; `plan_for_macs` finds the count for a MACs budget); the last step's report then counts
    them, and the report says how many (`extra_blocks`).
    """
    if importance == "taylor" and compute_gradients is None and steps > 1:
        raise ValueError("iterative taylor pruning needs fresh gradients before every step: pass compute_gradients")
    if extra_blocks < 0:
        raise ValueError(f"extra_blocks must be >= 0, got {extra_blocks}")
    if extra_blocks and not groupnorm.startswith("whole_groups"):
        raise ValueError("extra_blocks remove whole groups: use groupnorm='whole_groups' (or 'whole_groups+regroup')")
    macs, params = count_macs_params(model, example_inputs)
    pruner = StructuredPruner(
        model,
        example_inputs,
        importance=importance,
        ratio=ratio,
        steps=steps,
        global_pruning=global_pruning,
        round_to=round_to,
        ignored_layers=ignored_layers,
        output_layers=output_layers,
        custom_pruners=custom_pruners,
        head_ratio=head_ratio,
        prune_head_dims=prune_head_dims,
        unwrapped_parameters=unwrapped_parameters,
        groupnorm=groupnorm,
    )
    reports = []
    for _ in range(steps):
        if compute_gradients is not None:
            compute_gradients(model)
        reports.append(pruner.step())
        if pruner.current_step == steps and extra_blocks:
            for removed in range(extra_blocks):
                if not pruner.remove_block():
                    raise RuntimeError(f"only {removed} of {extra_blocks} extra blocks could be removed")
            macs_after, params_after = count_macs_params(model, example_inputs)
            reports[-1] = StepReport(
                step=reports[-1].step, ratio=reports[-1].ratio, macs=macs_after, params=params_after
            )
        model.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(model, reports[-1])
    return {
        "importance": importance,
        "ratio": ratio,
        "steps": steps,
        "global_pruning": global_pruning,
        "round_to": round_to,
        "head_ratio": head_ratio,
        "prune_head_dims": prune_head_dims,
        "groupnorm": groupnorm,
        "regrouped_groupnorms": pruner.regrouped_groupnorms(),
        "unwrapped_parameters": pruner.unwrapped,
        "width_attributes_unmatched": pruner.widths.unmatched,
        "macs_before": macs,
        "params_before": params,
        "macs_after": reports[-1].macs,
        "params_after": reports[-1].params,
        "per_step": [asdict(r) for r in reports],
        "history": pruner.history(),
        **({"extra_blocks": extra_blocks} if extra_blocks else {}),  # reports without refinement stay as they were
    }


def _macs_bisection(
    model: nn.Module, example_inputs: Any, macs_fraction: float, iterations: int, prune_kwargs: dict
) -> tuple[tuple[float, float], tuple[float, float], float]:
    """((lo, its fraction), (hi, its fraction), base MACs): hi the smallest ratio found whose one-step pruning keeps
    at most `macs_fraction` of the MACs, lo the largest found above it (0: no pruning)."""
    if not 0.0 < macs_fraction <= 1.0:
        raise ValueError(f"macs_fraction must be in (0, 1], got {macs_fraction}")
    base, _ = count_macs_params(model, example_inputs)
    seen: dict[float, float] = {0.0: 1.0}

    def fraction(ratio: float) -> float:
        if ratio not in seen:
            trial = copy.deepcopy(model)
            seen[ratio] = StructuredPruner(trial, example_inputs, ratio=ratio, **prune_kwargs).step().macs / base
        return seen[ratio]

    # scan upwards first: near ratio 1 (earlier with round_to) Torch-Pruning refuses to empty a layer and the
    # MACs jump back up, so the fraction is monotone only below the first ratio that reaches the target
    lo = 0.0
    for hi in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        if fraction(hi) <= macs_fraction:
            break
        lo = hi
    else:
        raise ValueError(f"no ratio up to 0.9 keeps at most {macs_fraction:.0%} of the MACs")
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if fraction(mid) <= macs_fraction:
            hi = mid
        else:
            lo = mid
    return (lo, fraction(lo)), (hi, fraction(hi)), base


def ratio_for_macs(
    model: nn.Module,
    example_inputs: Any,
    macs_fraction: float,
    *,
    iterations: int = 8,
    nearest: bool = False,
    **prune_kwargs,
) -> float:
    """Smallest channel ratio whose one-step pruning keeps at most `macs_fraction` of the MACs (bisection on copies);
    with `nearest`, the ratio whose MACs are closest to the fraction, above or below it (widths move in steps, so
    the closest reachable point may lie just above a budget).

    prune_kwargs go to StructuredPruner (importance, global_pruning, round_to, groupnorm, ...); the model is not
    changed.
    """
    (lo, f_lo), (hi, f_hi), _ = _macs_bisection(model, example_inputs, macs_fraction, iterations, prune_kwargs)
    if nearest and lo > 0 and abs(f_lo - macs_fraction) < abs(f_hi - macs_fraction):
        return lo
    return hi


@dataclass
class MacsPlan:
    """How to prune to a MACs budget: one channel `ratio` for every layer, then `extra_blocks` removed one at a
    time (`StructuredPruner.remove_block`); `fraction`: the share of the MACs that keeps."""

    ratio: float
    extra_blocks: int
    fraction: float


def plan_for_macs(
    model: nn.Module,
    example_inputs: Any,
    macs_fraction: float,
    *,
    nearest: bool = False,
    iterations: int = 8,
    **prune_kwargs,
) -> MacsPlan:
    """Per-layer widths for a MACs budget ("whole_groups" modes). One ratio for all layers moves their widths
    together (a 24- and a 48-channel layer with groups of 4 lose 1/6 and 1/12 of their width per group), so it
    can miss a budget by more than one layer's step. Here: the largest ratio found whose one-step pruning keeps
    more than `macs_fraction` (the bisection of `ratio_for_macs`), then one more block at a time from the layer
    keeping the largest share of its width (`StructuredPruner.remove_block`), counting the MACs after each, until
    they are at most the budget. The plan is the point kept: with `nearest`, the closest to the budget of the last
    point above it, the first at or below it and `ratio_for_macs`'s own; else the largest of those at or below it.
    Works on copies (the model is not changed); prune_kwargs go to StructuredPruner (importance is only used to
    pick blocks inside a layer, so the widths and MACs of the plan hold for any importance)."""
    if not str(prune_kwargs.get("groupnorm", "even")).startswith("whole_groups"):
        raise ValueError("per-layer refinement removes whole groups: use groupnorm='whole_groups' (+regroup)")
    (lo, _), (hi, f_hi), base = _macs_bisection(model, example_inputs, macs_fraction, iterations, prune_kwargs)
    trial = copy.deepcopy(model)
    pruner = StructuredPruner(trial, example_inputs, ratio=lo, **prune_kwargs)
    points = [MacsPlan(lo, 0, pruner.step().macs / base)]
    while points[-1].fraction > macs_fraction and pruner.remove_block():
        points.append(MacsPlan(lo, pruner.extra_blocks, count_macs_params(trial, example_inputs)[0] / base))
    points = [*points[-2:], MacsPlan(hi, 0, f_hi)]
    if nearest:
        return min(points, key=lambda p: abs(p.fraction - macs_fraction))
    return max((p for p in points if p.fraction <= macs_fraction), key=lambda p: p.fraction)
