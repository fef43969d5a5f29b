"""Pair store: noise regenerated from (seed, index), resumable sharded generation, checksums, formats, torchrun."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from slimflow.checkpoint import content_hash
from slimflow.flow import noise_for, noise_seed
from slimflow.pairs import PairStore, PairStoreError, decode_images, encode_images, generate_pairs
from slimflow.solvers import solve

REPO = Path(__file__).resolve().parents[1]
SHAPE = (1, 4, 4)
STEPS = 4
# Keyword arguments of one store: 6 shards of 8 pairs, 2 batches of 4 per shard.
SETTINGS = dict(
    n=48,
    shape=SHAPE,
    seed=3,
    solver=dict(method="euler", steps=STEPS),
    shard_size=8,
    batch_size=4,
    image_format="float16",
    teacher_hash="field:1-x",
    progress=False,
)


def field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """dx/dt = 1 - x: Euler with N steps maps z to 1 + (z - 1)(1 - 1/N)^N."""
    return 1.0 - x


def euler_closed_form(noise: torch.Tensor) -> torch.Tensor:
    return 1.0 + (noise - 1.0) * (1.0 - 1.0 / STEPS) ** STEPS


def shard_hashes(root: Path) -> dict[str, str]:
    return {r["file"]: r["sha256"] for r in json.loads((root / "manifest.json").read_text())["shards"]}


def subprocess_env() -> dict:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted single-process run of SETTINGS."""
    root = tmp_path_factory.mktemp("reference")
    generate_pairs(field, root, **SETTINGS)
    return root


# ------------------------------------------------------------------------------------------------- noise
def test_noise_is_bit_exact_and_independent_of_the_batch():
    full = noise_for(range(20), seed=5, shape=SHAPE)
    picked = noise_for(torch.tensor([17, 3, 3, 0]), seed=5, shape=SHAPE)
    assert torch.equal(picked, full[[17, 3, 3, 0]])
    assert torch.equal(noise_for(11, 5, SHAPE)[0], full[11])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(noise_for(range(20), 5, SHAPE), full)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(noise_for([4], 5, SHAPE, dtype=torch.float64)[0], full[4].double())
    assert not torch.equal(noise_for(range(20), 6, SHAPE), full)
    assert len({noise_seed(5, i) for i in range(100_000)}) == 100_000  # no shared streams inside a store
    with pytest.raises(ValueError, match="integers"):
        noise_for([0.5], 5, SHAPE)


def test_noise_is_the_same_on_the_generic_cpu_kernels():
    code = (
        "import hashlib; from slimflow.flow import noise_for; "
        "print(hashlib.sha256(noise_for(range(64), 9, (3, 8, 8)).numpy().tobytes()).hexdigest())"
    )
    env = {**subprocess_env(), "ATEN_CPU_CAPABILITY": "default"}  # no AVX2: torch's float32 randn would differ
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    here = hashlib.sha256(noise_for(range(64), 9, (3, 8, 8)).numpy().tobytes()).hexdigest()
    assert out.stdout.strip() == here


def test_noise_is_standard_normal_and_uncorrelated_across_indices():
    noise = noise_for(range(4000), seed=0, shape=(2,))  # the small-tensor path of randn
    wide = noise_for(range(500), seed=0, shape=(64,))  # the vectorised path
    for sample in (noise, wide):
        assert abs(sample.mean().item()) < 0.03
        assert abs(sample.std().item() - 1.0) < 0.03
    assert abs((noise[:-1] * noise[1:]).mean().item()) < 0.03  # neighbouring indices are independent draws


# ---------------------------------------------------------------------------------------- formats, hash
def test_uint8_and_float16_round_trip_bounds():
    x = torch.linspace(-1.0, 1.0, 10_001)
    back = decode_images(encode_images(x, "uint8"), "uint8")
    assert (back - x).abs().max().item() <= 1.0 / 255 + 1e-6
    assert encode_images(torch.tensor([-1.0, 1.0, -3.0, 2.0]), "uint8").tolist() == [0, 255, 0, 255]
    wide = torch.linspace(-3.0, 3.0, 10_001)
    back16 = decode_images(encode_images(wide, "float16"), "float16")
    assert ((back16 - wide).abs() <= wide.abs() * 2.0**-11 + 1e-7).all()
    with pytest.raises(ValueError, match="image_format"):
        encode_images(x, "bfloat16")


def test_content_hash_of_tensors_sees_names_shapes_dtypes_and_values():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    base = content_hash(model)
    assert base == content_hash(model.state_dict()) == content_hash(dict(reversed(model.state_dict().items())))
    state = model.state_dict()
    nudged = {**state, "2.bias": state["2.bias"] + 1e-7}
    renamed = {("x" + k if k == "2.bias" else k): v for k, v in state.items()}
    doubled = {**state, "2.bias": state["2.bias"].double()}
    reshaped = {**state, "0.weight": state["0.weight"].reshape(3, 4)}
    hashes = {content_hash(s) for s in (nudged, renamed, doubled, reshaped)}
    assert len(hashes) == 4 and base not in hashes
    # settings are hashed as sorted JSON: key order does not matter, values do
    assert (
        content_hash({"a": 1, "b": [1, 2]})
        == content_hash({"b": [1, 2], "a": 1})
        != content_hash({"a": 1, "b": [2, 1]})
    )


# ------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("image_format, tol", [("float16", None), ("uint8", 1.0 / 255 + 1e-6)])
def test_pairs_follow_the_closed_form_and_manifest_records_them(tmp_path, image_format, tol):
    rows_seen = []

    def counting_field(x, t):
        rows_seen.append(x.shape[0])
        return field(x, t)

    n = 20  # last shard is short
    manifest = generate_pairs(counting_field, tmp_path, **{**SETTINGS, "n": n, "image_format": image_format})
    store = PairStore(tmp_path)
    noise, images = store.get(range(n))
    assert torch.equal(noise, noise_for(range(n), SETTINGS["seed"], SHAPE))
    expected = euler_closed_form(noise)
    if image_format == "uint8":
        expected = expected.clamp(-1, 1)
        assert (images - expected).abs().max().item() <= tol
    else:
        assert ((images - expected).abs() <= expected.abs() * 2.0**-11 + 1e-6).all()

    solver_nfe = solve(field, noise[:4], method="euler", steps=STEPS).nfe
    assert manifest["nfe_per_pair_mean"] == solver_nfe
    assert manifest["nfe_total"] == solver_nfe * n == sum(rows_seen)
    assert (manifest["count"], manifest["shape"], manifest["seed"]) == (n, list(SHAPE), SETTINGS["seed"])
    assert (manifest["status"], manifest["image_format"]) == ("complete", image_format)
    assert manifest["solver"] == SETTINGS["solver"] and manifest["teacher_hash"] == SETTINGS["teacher_hash"]
    assert manifest["pairs_per_s"] > 0 and manifest["created"] <= manifest["finished"]
    assert [(r["start"], r["stop"], r["count"]) for r in manifest["shards"]] == [(0, 8, 8), (8, 16, 8), (16, 20, 4)]
    for record in manifest["shards"]:
        assert record["file"] in os.listdir(tmp_path)
        assert record["bytes"] == (tmp_path / record["file"]).stat().st_size
    store.verify()
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest


def test_adaptive_solver_nfe_per_pair_is_the_solvers_count(tmp_path):
    solver = dict(method="dopri5", rtol=1e-6, atol=1e-6)
    manifest = generate_pairs(field, tmp_path, **{**SETTINGS, "n": 12, "solver": solver})
    noise, images = PairStore(tmp_path).get(range(12))
    batch_nfe = [solve(field, noise[i : i + 4], **solver).nfe for i in range(0, 12, 4)]
    assert manifest["nfe_total"] == 4 * sum(batch_nfe)
    assert manifest["nfe_per_pair_mean"] == pytest.approx(sum(batch_nfe) / 3)
    exact = 1.0 + (noise - 1.0) * torch.exp(torch.tensor(-1.0))  # x(1) of dx/dt = 1 - x
    assert (images - exact).abs().max().item() < 2e-3  # float16 storage of values up to ~2.5


class DropoutTeacher(torch.nn.Module):
    """A velocity network whose output depends on train/eval mode."""

    def __init__(self):
        super().__init__()
        self.dropout = torch.nn.Dropout(0.5)
        self.linear = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(x.flatten(1))).reshape(x.shape)


def test_module_teacher_runs_in_eval_mode_and_is_hashed(tmp_path):
    velocity = DropoutTeacher()
    manifest = generate_pairs(velocity, tmp_path, **{**SETTINGS, "n": 8, "teacher_hash": None})
    assert velocity.training  # mode restored
    assert manifest["teacher_hash"] == content_hash(velocity)
    noise, images = PairStore(tmp_path).get(range(8))
    with torch.no_grad():
        expected = solve(velocity.eval(), noise, method="euler", steps=STEPS).x
    assert torch.equal(images, expected.half().float())  # dropout was off


def test_random_batches_across_shards_come_back_in_order(reference):
    store = PairStore(reference, open_shards=2)
    noise_all, images_all = store.get(range(len(store)))
    order = torch.randperm(len(store))[:30]
    noise, images = store.batch(order)
    assert torch.equal(noise, noise_all[order]) and torch.equal(images, images_all[order])
    assert store.shape == SHAPE and len(store) == SETTINGS["n"]
    with pytest.raises(IndexError, match=r"\[0, 48\)"):
        store.get([48])


def test_failure_mid_run_then_resume_equals_uninterrupted_run(tmp_path, reference):
    calls = []

    def failing_field(x, t):
        calls.append(x.shape[0])
        if len(calls) > 2 * 2 * STEPS + 3:  # during the third shard
            raise RuntimeError("teacher crashed")
        return field(x, t)

    with pytest.raises(RuntimeError, match="teacher crashed"):
        generate_pairs(failing_field, tmp_path, **SETTINGS)
    assert json.loads((tmp_path / "manifest.json").read_text())["status"] == "running"
    with pytest.raises(PairStoreError, match="unfinished"):
        PairStore(tmp_path)
    calls.clear()
    generate_pairs(lambda x, t: (calls.append(x.shape[0]), field(x, t))[1], tmp_path, **SETTINGS)
    assert sum(calls) == (SETTINGS["n"] - 2 * 8) * STEPS  # only the four missing shards were solved
    assert shard_hashes(tmp_path) == shard_hashes(reference)


KILL_SCRIPT = """
import sys, time
from slimflow.pairs import generate_pairs

def slow_field(x, t):
    time.sleep(0.05)
    return 1.0 - x

generate_pairs(slow_field, sys.argv[1], n=48, shape=(1, 4, 4), seed=3, solver=dict(method="euler", steps=4),
               shard_size=8, batch_size=4, image_format="float16", teacher_hash="field:1-x", progress=False)
"""


def test_sigkill_during_generation_then_resume_equals_uninterrupted_run(tmp_path, reference):
    root = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(root)],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not (root / "shard_00000.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the generation subprocess wrote no shard in 120 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    done = sorted(p.name for p in root.glob("shard_*.json"))
    assert 1 <= len(done) < 6
    assert json.loads((root / "manifest.json").read_text())["status"] == "running"
    kept = {name: (root / name).stat().st_mtime_ns for name in done}
    partial = root / ".shard_00005.safetensors.tmp-99999"  # what a kill inside save_file leaves behind
    partial.write_bytes(b"\x00" * 100)

    generate_pairs(field, root, **SETTINGS)
    assert not list(root.glob(".*.tmp-*"))
    assert {name: (root / name).stat().st_mtime_ns for name in done} == kept  # finished shards were not redone
    assert shard_hashes(root) == shard_hashes(reference)
    ours, theirs = PairStore(root).get(range(48)), PairStore(reference).get(range(48))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


# ------------------------------------------------------------------------------------------- integrity
def copy_store(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_corrupted_shard_is_named_with_both_checksums_and_repaired_by_rerun(tmp_path, reference):
    root = copy_store(reference, tmp_path / "store")
    shard = root / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # a flipped byte inside the image data: same size, different content
    shard.write_bytes(bytes(data))
    expected = shard_hashes(reference)["shard_00001.safetensors"]

    store = PairStore(root)
    store.get(range(8))  # other shards still read
    with pytest.raises(PairStoreError, match=f"shard_00001.safetensors.*corrupt.*manifest expects {expected}"):
        store.get([9])
    with pytest.raises(PairStoreError, match="shard_00001.safetensors"):
        PairStore(root).verify()

    generate_pairs(field, root, **SETTINGS)
    assert shard_hashes(root) == shard_hashes(reference)
    PairStore(root).verify()


def test_missing_or_truncated_shard_is_named_at_open(tmp_path, reference):
    root = copy_store(reference, tmp_path / "store")
    (root / "shard_00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard_00002.safetensors"):
        PairStore(root)
    shard = root / "shard_00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    generate_pairs(field, root, **{**SETTINGS, "n": 48})  # repairs both
    PairStore(root).verify()
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(PairStoreError, match="shard_00004.safetensors .* manifest says"):
        PairStore(root)


def test_a_complete_store_is_read_while_another_process_holds_the_writer_lock(tmp_path, reference):
    """Runs sharing a finished store start side by side: the check of a complete store takes no lock. A store that
    needs work still waits for no one: it is refused while the lock is held, and made once it is free."""
    import fcntl

    root = copy_store(reference, tmp_path / "store")
    calls = []
    with open(root / ".lock", "a+") as other:  # another open file: flock conflicts as with another process
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        manifest = generate_pairs(lambda x, t: (calls.append(1), field(x, t))[1], root, **SETTINGS)
        assert manifest["status"] == "complete" and calls == []
        assert shard_hashes(root) == shard_hashes(reference)
        altered = json.loads((root / "manifest.json").read_text())
        altered["shards"][0]["seconds"] += 1.0  # the manifest's copy of a record altered: rewriting it is a write
        (root / "manifest.json").write_text(json.dumps(altered))
        with pytest.raises(PairStoreError, match="another process is writing the pair store"):
            generate_pairs(field, root, **SETTINGS)
        (root / "shard_00003.safetensors").unlink()
        with pytest.raises(PairStoreError, match="another process is writing the pair store"):
            generate_pairs(field, root, **SETTINGS)
    generate_pairs(field, root, **SETTINGS)
    assert shard_hashes(root) == shard_hashes(reference)
    PairStore(root).verify()
    first = json.loads((root / "manifest.json").read_text())["shards"][0]
    assert first == json.loads((reference / "manifest.json").read_text())["shards"][0]


def test_store_made_by_a_torch_with_other_noise_is_refused(tmp_path, reference):
    root = copy_store(reference, tmp_path / "store")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["noise_check"] = "0" * 64  # what another torch RNG would have recorded
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PairStoreError, match="noise .* differs"):
        PairStore(root)


def test_shards_of_other_settings_are_never_reused(tmp_path, reference):
    root = copy_store(reference, tmp_path / "store")
    (root / "manifest.json").unlink()  # the settings record is gone, the shards and their records stay
    generate_pairs(field, root, **{**SETTINGS, "seed": 4})
    assert not set(shard_hashes(root).values()) & set(shard_hashes(reference).values())
    noise, images = PairStore(root).get(range(48))
    assert torch.equal(noise, noise_for(range(48), 4, SHAPE))
    assert ((images - euler_closed_form(noise)).abs() <= 2e-3).all()


def test_other_settings_on_resume_are_refused_with_the_differences(tmp_path, reference):
    root = copy_store(reference, tmp_path / "store")
    before = shard_hashes(root)
    differences = r"(?s)other settings.*seed: store has 3, requested 4.*solver.*teacher_hash"
    with pytest.raises(PairStoreError, match=differences):
        generate_pairs(
            field, root, **{**SETTINGS, "seed": 4, "solver": dict(method="heun", steps=2), "teacher_hash": "another"}
        )
    with pytest.raises(PairStoreError, match="shape"):
        generate_pairs(field, root, **{**SETTINGS, "shape": (1, 2, 8)})
    assert shard_hashes(root) == before


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="teacher_hash is required"):
        generate_pairs(field, tmp_path, **{**SETTINGS, "teacher_hash": None})
    with pytest.raises(ValueError, match="solver"):
        generate_pairs(field, tmp_path, **{**SETTINGS, "solver": dict(steps=4)})
    with pytest.raises(ValueError, match="image_format"):
        generate_pairs(field, tmp_path, **{**SETTINGS, "image_format": "png"})
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        PairStore(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------ distributed
TORCHRUN_SCRIPT = """
import sys
import torch.distributed as dist
from slimflow.pairs import generate_pairs

dist.init_process_group("gloo")
manifest = generate_pairs(lambda x, t: 1.0 - x, sys.argv[1], n=48, shape=(1, 4, 4), seed=3,
                          solver=dict(method="euler", steps=4), shard_size=8, batch_size=4,
                          image_format="float16", teacher_hash="field:1-x", progress=False)
assert manifest["status"] == "complete"
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_torchrun_writes_the_same_pairs(tmp_path, reference):
    script = tmp_path / "generate.py"
    script.write_text(textwrap.dedent(TORCHRUN_SCRIPT))
    root = tmp_path / "store"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            str(script),
            str(root),
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert shard_hashes(root) == shard_hashes(reference)
    PairStore(root).verify()
