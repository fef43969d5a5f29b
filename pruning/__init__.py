"""Generic pruning over any nn.Module: structural channel pruning (Torch-Pruning), unstructured magnitude/AP
pruning with masks, dead-neuron rate, Taylor gradients from any loss, recovery fine-tuning, save/load.

Recovery plugs in through `loss_fn(model, batch) -> loss` and an iterable of batches (see pruning.recovery).
"""

from .dnr import DeadNeuronMonitor, write_dnr
from .measure import count_macs_params, measure_latency
from .models import build_model, create_model, model_spec
from .network import prune_network
from .recovery import LossFn, classification_loss, evaluate_accuracy, fine_tune, image_batches
from .serialization import load_masks, load_pruned, save_pruned
from .structured import (
    IMPORTANCES,
    MacsPlan,
    MatmulPruner,
    StepReport,
    StructuredPruner,
    find_output_layers,
    plan_for_macs,
    prune_structured,
    ratio_for_macs,
)
from .taylor import accumulate_gradients
from .unstructured import (
    WeightMasks,
    attach_masks,
    cycle_rate,
    iterative_pruning,
    lamp_scores,
    masks_of,
    n_of_m_masks,
    ones_masks,
    prunable_weights,
    prune_cycle,
    rewind,
    snapshot,
)

__all__ = [
    "DeadNeuronMonitor",
    "write_dnr",
    "count_macs_params",
    "measure_latency",
    "build_model",
    "create_model",
    "model_spec",
    "prune_network",
    "LossFn",
    "classification_loss",
    "evaluate_accuracy",
    "fine_tune",
    "image_batches",
    "load_masks",
    "load_pruned",
    "save_pruned",
    "IMPORTANCES",
    "MacsPlan",
    "MatmulPruner",
    "StepReport",
    "StructuredPruner",
    "find_output_layers",
    "plan_for_macs",
    "prune_structured",
    "ratio_for_macs",
    "accumulate_gradients",
    "WeightMasks",
    "attach_masks",
    "cycle_rate",
    "iterative_pruning",
    "lamp_scores",
    "masks_of",
    "n_of_m_masks",
    "ones_masks",
    "prunable_weights",
    "prune_cycle",
    "rewind",
    "snapshot",
]
