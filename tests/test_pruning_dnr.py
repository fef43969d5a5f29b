"""Dead-neuron rate on hand-built layers (known inputs → known dead fraction), and its TensorBoard output."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from pruning import DeadNeuronMonitor, write_dnr

# pre-activations of the first layer for these inputs: (1, 1, -2), (-1, 2, -1), (0, -3, 3), (2, -1, -1)
INPUTS = torch.tensor([[1.0, 1.0], [-1.0, 2.0], [0.0, -3.0], [2.0, -1.0]])


def hand_net(activation: nn.Module) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(2, 3), activation, nn.Linear(3, 1), nn.ReLU())
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        net[0].bias.zero_()
        net[2].weight.fill_(1.0)
        net[2].bias.fill_(-1.0)
    return net


def test_relu_dead_rate_per_layer_and_overall():
    net = hand_net(nn.ReLU())
    with DeadNeuronMonitor(net) as monitor:
        net(INPUTS)
        rates = monitor.rates()
        # layer 1: zeros 1 + 2 + 2 + 2 = 7 of 12 (a pre-activation of exactly 0 is dead too);
        # layer 2: relu sums 2, 2, 3, 2 minus 1 are all positive → 0 of 4
        assert rates["layers"] == {"1": 7 / 12, "3": 0.0}
        assert rates["overall"] == 7 / 16
        net(INPUTS[:1])  # counts accumulate over forward passes: + 1 of 3 and 0 of 1
        assert monitor.rates()["layers"]["1"] == 8 / 15
        monitor.reset()
        with pytest.raises(ValueError, match="no forward"):
            monitor.rates()
    assert not net[1]._forward_hooks, "closing removes the hooks"


@pytest.mark.parametrize("threshold, expected", [(0.0, 7 / 12), (-0.5, 6 / 12), (-2.5, 1 / 12)])
def test_silu_counts_pre_activations_below_threshold(threshold, expected):
    net = hand_net(nn.SiLU(inplace=True))  # in place: the count must see the input before it is overwritten
    with DeadNeuronMonitor(net, threshold=threshold) as monitor:
        net(INPUTS)
        assert monitor.rates()["layers"]["1"] == expected


def test_gelu_and_no_activation():
    net = hand_net(nn.GELU())
    with DeadNeuronMonitor(net) as monitor:
        net(INPUTS)
        assert monitor.rates()["layers"]["1"] == 7 / 12
    with pytest.raises(ValueError, match="no ReLU"):
        DeadNeuronMonitor(nn.Linear(2, 2))


def test_rates_go_to_tensorboard_event_files(tmp_path):
    net = hand_net(nn.ReLU())
    with DeadNeuronMonitor(net) as monitor:
        net(INPUTS)
        rates = monitor.rates()
    writer = SummaryWriter(str(tmp_path))
    write_dnr(writer, rates, step=3)
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"dnr/overall", "dnr/1", "dnr/3"}
    (scalar,) = events.Scalars("dnr/overall")
    assert scalar.step == 3 and scalar.value == pytest.approx(7 / 16)
