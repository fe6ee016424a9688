"""torchrun + DistributedDataParallel on the CPU (gloo, 2 processes): the CI machine's case."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import engine
import main
import predict

ROOT = Path(__file__).resolve().parents[1]


def flags(sample_root, out, *extra):
    # a constant learning rate (--min_lr_ratio 1): a run of 1 epoch extended to 2 then sees the
    # rates a 2-epoch run sees (a cosine would stretch), so the resume test can compare weights;
    # a weight average (--ema_decay): kept on every process, saved once, resumed with the rest
    return ["--data_root", str(sample_root), "--weights", "none", "--image_size", "32", "--max_per_class", "20",
            "--batch_size", "8", "--workers", "0", "--min_lr_ratio", "1", "--ema_decay", "0.9",
            "--output_dir", str(out), "--cache_dir", str(out.parent / "cache"), *extra]


def torchrun(*argv, timeout=600):
    """python -m torch.distributed.run --standalone --nproc_per_node=2 main.py ARGV; returns the finished process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "main.py"),
           *map(str, argv)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def two_process_run(sample_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    done = torchrun(*flags(sample_root, out, "--epochs", "2"))
    return out, done


def test_two_processes_train_and_write_one_set_of_results(two_process_run, sample_root, tmp_path):
    out, done = two_process_run
    assert done.stdout.count("epoch 2/2") == 1  # rank 0 alone prints
    assert "2 processes, batch 8 each: global batch 16" in done.stdout
    for name in ("summary.md", "metrics.json", "predictions.csv", "split.csv", "checkpoints/best.pt"):
        assert (out / name).is_file(), name
    ckpt = engine.load_checkpoint(out / "checkpoints" / "best.pt")
    for weights in ("model", "train_model"):  # the average and the training weights: plain models' state_dicts
        assert not any(k.startswith("module.") for k in ckpt[weights])
    p = predict.Predictor(out / "checkpoints" / "best.pt", no_crop=True)
    face = sorted((sample_root / "fake_data").glob("*.jpg"))[0]
    assert 0 <= p.predict_file(face)["fake_probability"] <= 1
    # the same flags in one process make the same split
    main.main(main.parse_args(flags(sample_root, tmp_path / "single", "--epochs", "1")))
    assert (tmp_path / "single" / "split.csv").read_text() == (out / "split.csv").read_text()


def test_distributed_evaluation_equals_single_process_exactly(two_process_run, tmp_path):
    out, _ = two_process_run
    ckpt = out / "checkpoints" / "best.pt"
    common = ["--evaluate_only", "--checkpoint", str(ckpt), "--workers", "0", "--precision", "fp32",
              "--cache_dir", str(out.parent / "cache")]
    torchrun(*common, "--output_dir", tmp_path / "two")
    main.main(main.parse_args([*common, "--output_dir", str(tmp_path / "one")]))
    two, one = rows(tmp_path / "two" / "evaluation" / "predictions.csv"), rows(tmp_path / "one" / "evaluation" /
                                                                                "predictions.csv")
    assert len(one) == 6 and two == one  # every image once, same order, same P(fake) to the last digit
    m2, m1 = (json.loads((tmp_path / r / "evaluation" / "metrics.json").read_text()) for r in ("two", "one"))
    assert m2["at_val_threshold"] == m1["at_val_threshold"]


def test_two_processes_resumed_after_epoch_1_end_like_an_uninterrupted_run(two_process_run, sample_root, tmp_path):
    straight, _ = two_process_run
    torchrun(*flags(sample_root, tmp_path / "run", "--epochs", "1"))  # stopped after epoch 1...
    torchrun("--resume", "--output_dir", tmp_path / "run", "--epochs", "2")  # ...continued to 2
    a = engine.load_checkpoint(straight / "checkpoints" / "last.pt")
    b = engine.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert b["epoch"] == a["epoch"] == 1
    for weights in ("model", "train_model"):
        for k in a[weights]:
            assert torch.equal(a[weights][k], b[weights][k]), (weights, k)


def test_a_killed_process_stops_the_other_and_last_pt_survives(sample_root, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "main.py"),
           *flags(sample_root, out, "--epochs", "40", "--dist_timeout", "60")]
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    last = out / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and run.poll() is None:
        time.sleep(0.5)
    assert last.exists(), "no epoch finished"
    children = Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split()
    workers = [int(p) for p in children if "main.py" in Path(f"/proc/{p}/cmdline").read_text()]
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)  # one process dies mid-run
    killed = time.time()
    _, err = run.communicate(timeout=180)
    assert run.returncode != 0 and time.time() - killed < 120, "the survivor did not stop in time"
    ckpt = engine.load_checkpoint(last)  # intact: written atomically
    assert 0 <= ckpt["epoch"] < 39
    torchrun("--resume", "--output_dir", out, "--epochs", str(ckpt["epoch"] + 2))
    assert engine.load_checkpoint(last)["epoch"] == ckpt["epoch"] + 1


def _ddp_step(rank, x, y, init, path):
    """One DDP SGD step on this rank's half of (x, y); rank 0 saves the resulting weights."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["TEST_DDP_PORT"])
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    model.load_state_dict(init)
    model.eval()  # BatchNorm from its running statistics: each image's gradient is the same alone or in a batch
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    half = len(x) // 2
    nn.functional.cross_entropy(ddp(x[rank * half:(rank + 1) * half]), y[rank * half:(rank + 1) * half]).backward()
    optimizer.step()
    if rank == 0:
        torch.save(model.state_dict(), path)
    torch.distributed.destroy_process_group()


def test_gradients_are_averaged_over_the_processes(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 8, 8), torch.tensor([0, 1] * 4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["TEST_DDP_PORT"] = str(s.getsockname()[1])
    mp.spawn(_ddp_step, args=(x, y, init, tmp_path / "ddp.pt"), nprocs=2)
    model.eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(model(x), y).backward()  # one process, all 8 images
    optimizer.step()
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-6)
