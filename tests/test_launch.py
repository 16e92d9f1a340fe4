"""The launch scripts' dry runs print the commands they would run (launch/*.sh)."""

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dry_run(script, *args):
    args = list(args)
    args.insert(args.index("--") if "--" in args else len(args), "--dry-run")  # before the trainer's arguments
    out = subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    return out.returncode, out.stdout, out.stderr


def test_tpu_pod_creates_copies_installs_and_trains_on_every_worker():
    code, out, _ = dry_run("tpu_pod.sh", "--tpu=pod1", "--zone=us-east5-a", "--project=proj", "--accelerator=v5p-64",
                           "--create", "--config=experiments/samba_1b.py", "--workdir=gs://bucket/run")
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].startswith("gcloud --project=proj compute tpus queued-resources create pod1")
    assert "--accelerator-type=v5p-64" in lines[0] and "--spot" in lines[0]
    assert "tpu-vm scp --recurse" in lines[2] and "--worker=all" in lines[2]
    assert "pip\\ install" in lines[3] and "--worker=all" in lines[3]
    assert lines[4].startswith("gcloud --project=proj compute tpus tpu-vm ssh pod1 --zone=us-east5-a --worker=all")
    assert "samba_jax.train\\ --config=experiments/samba_1b.py\\ --workdir=gs://bucket/run" in lines[4]


@pytest.mark.parametrize("args,message", [
    (("--zone=z", "--project=p", "--config=c", "--workdir=gs://b"), "--tpu=... is required"),
    (("--tpu=t", "--zone=z", "--project=p", "--config=c", "--workdir=/local"), "must be a gs:// path"),
    (("--tpu=t", "--zone=z", "--project=p", "--config=c", "--workdir=gs://b", "--create"), "--accelerator"),
])
def test_tpu_pod_names_missing_or_bad_arguments(args, message):
    code, _, err = dry_run("tpu_pod.sh", *args)
    assert code == 2 and message in err


def test_slurm_writes_one_task_per_gpu_with_signal_forwarding_and_requeue(tmp_path):
    code, out, _ = dry_run("slurm.sh", "--nodes=4", "--gpus-per-node=8", "--partition=gpu",
                           "--config=experiments/samba_1b.py", f"--workdir={tmp_path}", "--", "--config.mesh.tensor=2")
    assert code == 0
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --signal=B:TERM@120",
                 "#SBATCH --partition=gpu", "trap 'kill -TERM $PID' TERM", "scontrol requeue $SLURM_JOB_ID",
                 f"sbatch {tmp_path}/slurm/train.sbatch"):
        assert line in out, line
    assert (f"srun --kill-on-bad-exit=0 python -m samba_jax.train --config=experiments/samba_1b.py "
            f"--workdir={tmp_path} --config.mesh.tensor=2") in out
    assert not os.path.exists(tmp_path / "slurm"), "a dry run writes nothing"


def test_xpk_sets_the_across_slice_degree():
    code, out, _ = dry_run("gke_xpk.sh", "--cluster=c", "--project=p", "--zone=z", "--tpu-type=v5p-256",
                           "--num-slices=2", "--image=img", "--config=experiments/samba_1b.py", "--workdir=gs://b/r")
    assert code == 0
    assert out.startswith("xpk workload create --cluster=c --project=p --zone=z --workload=samba-jax")
    assert "--num-slices=2" in out and "--config.mesh.dcn_data=2" in out
