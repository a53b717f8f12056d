"""DDP on CPU with gloo: two processes against one, rank-0-only writes, distributed
evaluation, resume on another world size, and a killed rank ending the job."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from cps_fast.runlog import read_metrics

from engine_helpers import freeze_batchnorm, tiny_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, root, run_dir, result_dir, sets):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from cps_fast import distributed
    from cps_fast.engine.trainer import Trainer
    info, device = distributed.init("cpu")
    try:
        cfg = tiny_config(root, "cps", **sets)
        trainer = Trainer(cfg, run_dir, dist_info=info, device=device, quiet=True)
        freeze_batchnorm(trainer.nets)
        rec = trainer.run()
        torch.save({"params": [p.detach().clone() for n in trainer.nets for p in n.parameters()],
                    "confusion": rec["confusion"]["a"]},
                   os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


def _single(root, run_dir, sets):
    from cps_fast.engine.trainer import Trainer
    torch.set_num_threads(1)
    trainer = Trainer(tiny_config(root, "cps", **sets), run_dir, quiet=True)
    freeze_batchnorm(trainer.nets)
    rec = trainer.run()
    return trainer, rec


@pytest.fixture(scope="module")
def two_rank_run(synth_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    # Per-rank batch 2 (global 4); scales >= 1 so that no crop is padded and every rank
    # averages its loss over the same number of pixels (the global mean is then the mean
    # of the ranks' means, which is what DDP's gradient averaging computes).
    sets = {"data.batch_size": 2, "data.unlabeled_batch_size": 2, "train.iters": 3,
            "optim.lr_scaling": "none", "data.val_max_images": 5, "data.scales": "1.0,1.25"}
    mp.spawn(_worker, args=(2, _free_port(), synth_root, str(base / "run"), str(base), sets),
             nprocs=2, join=True)
    return base, sets


def test_ranks_hold_identical_parameters(two_rank_run):
    base, _ = two_rank_run
    r0 = torch.load(base / "rank0.pt")
    r1 = torch.load(base / "rank1.pt")
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)  # DDP reduced both networks' gradients


def test_two_processes_match_one_process_with_the_global_batch(two_rank_run, synth_root, tmp_path):
    base, sets = two_rank_run
    single_sets = dict(sets, **{"data.batch_size": 4, "data.unlabeled_batch_size": 4})
    trainer, _ = _single(synth_root, tmp_path / "single", single_sets)
    start, _ = _single(synth_root, tmp_path / "start", dict(single_sets, **{"train.iters": 1,
                                                                        "optim.lr": 1e-30}))
    ddp = torch.load(base / "rank0.pt")["params"]
    one = [p.detach() for n in trainer.nets for p in n.parameters()]
    init = [p.detach() for n in start.nets for p in n.parameters()]
    moved = torch.sqrt(sum(((o - i) ** 2).sum() for o, i in zip(one, init)))
    diff = torch.sqrt(sum(((d - o) ** 2).sum() for d, o in zip(ddp, one)))
    # Same samples, same augmentation, gradients averaged over ranks. What remains is the
    # supervised loss being a mean per rank (as the official code, which averages each
    # GPU's mean) while one process takes the mean over all valid pixels: the ignored
    # (255) borders differ a little between the ranks' images.
    assert float(moved) > 0
    assert float(diff) < 0.05 * float(moved), (float(diff), float(moved))


def test_only_rank0_writes(two_rank_run):
    base, _ = two_rank_run
    recs = read_metrics(base / "run")
    steps = [r["step"] for r in recs if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 3
    cfg = json.loads((base / "run" / "config.json").read_text())
    assert cfg["derived"]["world_size"] == 2 and cfg["derived"]["global_batch"] == 4
    assert len(os.listdir(base / "run" / "tensorboard")) == 1


def test_distributed_miou_equals_single_process(two_rank_run, synth_root):
    """Resume the 2-rank checkpoint in one process (another world size) and evaluate."""
    base, sets = two_rank_run
    from cps_fast.engine.trainer import Trainer
    trainer = Trainer(tiny_config(synth_root, "cps", **sets), base / "run", resume="latest",
                      quiet=True)
    assert trainer.step == 3
    rec = trainer.evaluate()
    assert torch.equal(rec["confusion"]["a"], torch.load(base / "rank0.pt")["confusion"])
    assert torch.equal(rec["confusion"]["a"], torch.load(base / "rank1.pt")["confusion"])


def test_a_killed_rank_ends_the_job(synth_root, tmp_path):
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            f"--master_port={_free_port()}", "-m", "cps_fast.train", "--data-root", synth_root,
            "--out", str(tmp_path / "run"), "--iters", "5000", "--quiet",
            "--set", "data.crop_size=48", "--set", "data.batch_size=2",
            "--set", "data.unlabeled_batch_size=2", "--set", "data.num_workers=0",
            "--set", "model.aspp_channels=16", "--set", "model.decoder_channels=16",
            "--set", "model.low_level_channels=8", "--set", "train.log_every=1",
            "--set", "data.check=none"]
    env = dict(os.environ, CPS_FAST_DIST_TIMEOUT="60", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not read_metrics(tmp_path / "run"):
            time.sleep(0.5)
        assert read_metrics(tmp_path / "run"), "the job never logged a step"
        workers = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "cps_fast.train"],
                                 capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers
        os.kill(int(workers[1]), signal.SIGKILL)
        t0 = time.time()
        _, err = proc.communicate(timeout=180)
        assert proc.returncode != 0
        assert time.time() - t0 < 120
        assert "SIGKILL" in err or "Signal 9" in err or "failed" in err.lower()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
