import time

import torch
from torch import nn

from slimflow.cost import count_macs, count_params, measure_cost, median_ms, peak_memory_mib
from teachers.unet import build_unet


class SmallConvNet(nn.Module):
    """conv3×3 (1→4, bias) → ReLU → conv1×1 (4→2, no bias), + t (functional) → global avg pool → linear 2→3."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 2, 1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 3)

    def forward(self, x, t):
        h = self.conv2(self.relu(self.conv1(x))) + t[:, None, None, None]
        return self.fc(self.pool(h).flatten(1))


def test_macs_and_params_of_a_known_conv_net():
    h = w = 8
    # Torch-Pruning's count per image: conv = H·W·C_out·C_in·k² (+ H·W·C_out for a bias); ReLU and pooling one op
    # per input element; linear = in·out + out (bias). The functional "+ t" is not counted.
    conv1 = h * w * 4 * 1 * 3 * 3 + h * w * 4
    relu = 4 * h * w
    conv2 = h * w * 2 * 4 * 1 * 1
    pool = 2 * h * w
    fc = 2 * 3 + 3
    assert count_macs(SmallConvNet(), (1, h, w)) == conv1 + relu + conv2 + pool + fc == 3465
    assert count_params(SmallConvNet()) == (4 * 9 + 4) + (2 * 4) + (2 * 3 + 3) == 57


def test_median_ms_of_a_known_duration():
    ms = median_ms(lambda: time.sleep(0.01), torch.device("cpu"), warmup=1, repeats=5)
    assert 10.0 <= ms < 60.0


def tiny_unet():
    return build_unet(
        {
            "in_channels": 1,
            "resolution": 16,
            "nf": 8,
            "ch_mult": [1, 2],
            "num_res_blocks": 1,
            "attn_resolutions": [8],
            "dropout": 0.0,
        }
    ).eval()


def test_measure_cost_times_each_batch_size_through_the_solver():
    model = tiny_unet()
    seen = []
    model.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    cost = measure_cost(model, (1, 16, 16), method="heun", steps=2, batch_sizes=(4, 1), warmup=1, repeats=3)
    assert sorted(set(seen)) == [1, 4]
    # 1 call at batch 1 to count MACs; per batch size: 1 NFE-count run + 1 warm-up + 3 timed runs, 4 NFE each;
    # then 1 memory run at the largest batch
    assert seen.count(1) == 1 + 5 * 4 and seen.count(4) == 6 * 4
    assert cost["latency_ms_b1"] > 0 and cost["latency_ms_b4"] > 0
    assert cost["nfe"] == 4 and cost["macs_per_sample"] == 4 * cost["macs_per_nfe"] > 0
    assert cost["params"] == count_params(model)
    assert "peak_mem_mib_b4" in cost


def test_cpu_peak_memory_counts_live_tensor_bytes(capfd):
    def run():
        x = torch.ones(16 * 2**20)  # 64 MiB of float32
        y = x * 2  # + 64 MiB while x is alive
        del x
        return (y + 1).sum()  # y + 1 takes 64 MiB again after x was freed: the peak stays 128 MiB

    peak = peak_memory_mib(run, torch.device("cpu"))
    assert 128 <= peak < 128.01, peak
    assert capfd.readouterr().err == ""  # the profiler's C++ chatter is silenced
