"""`dina train` as a job (issue 16, items 2, 3 and 6): seeded before the LoRA and head are built, resumed from the
newest complete checkpoint after a kill -9 or a full disk, and one run per output folder."""

import errno
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from test_training import TINY, cache, make_pairs

from modeling_dina import modeling_loading as modeling
from modeling_dina.cli import main
from modeling_dina.safe_files import exclusive_lock
from modeling_dina.training.checkpoints import COMPLETE_NAME, latest_complete_checkpoint


@pytest.fixture(scope="module")
def config_for(tiny_sd3_dir, tmp_path_factory):
    """`config_for(output_dir, **training)` writes a `dina train` config (fresh tiny model, 8 cached pairs, seed 42,
    a checkpoint every step) and returns its path."""
    data = tmp_path_factory.mktemp("jobs_cache")
    cache(make_pairs(8, 1), tiny_sd3_dir, data)
    configs = tmp_path_factory.mktemp("jobs_configs")

    def write(output_dir, **training):
        config = {
            "model": {"base": tiny_sd3_dir, "config": TINY},
            "data": {"train": {"cached": str(data)}},
            "training": {
                "output_dir": str(output_dir),
                "per_device_train_batch_size": 4,
                "learning_rate": 1e-2,
                "max_steps": 3,
                "save_steps": 1,
                "seed": 42,
                "report_to": "none",
                "disable_tqdm": True,
                "use_cpu": True,
                **training,
            },
        }
        path = configs / f"{os.path.basename(output_dir)}.json"
        path.write_text(json.dumps(config))
        return str(path)

    return write


@pytest.fixture(scope="module")
def reference_run(config_for, tmp_path_factory):
    """One uninterrupted 3-step run: its output folder."""
    run = tmp_path_factory.mktemp("jobs") / "reference"
    main(["train", "--config", config_for(run)])
    return run


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "model.safetensors"))


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ"


def test_the_same_config_trains_bit_for_bit_the_same(config_for, reference_run, tmp_path):
    main(["train", "--config", config_for(tmp_path / "again")])
    assert_identical(weights(reference_run), weights(tmp_path / "again"))
    main(["train", "--config", config_for(tmp_path / "other_seed", seed=7)])
    assert not torch.equal(*(weights(f)["reward_head.head.weight"] for f in (reference_run, tmp_path / "other_seed")))


def test_every_checkpoint_is_marked_complete(reference_run):
    for step in (1, 2, 3):
        checkpoint = reference_run / f"checkpoint-{step}"
        files = json.loads((checkpoint / COMPLETE_NAME).read_text())["files"]
        assert {"model.safetensors", "trainer_state.json", "optimizer.pt"} <= set(files)
        assert files["model.safetensors"] == os.path.getsize(checkpoint / "model.safetensors")
    assert latest_complete_checkpoint(str(reference_run)) == str(reference_run / "checkpoint-3")


KILLED_WHILE_SAVING = textwrap.dedent(
    """
    import os, signal, sys
    from transformers import Trainer
    from modeling_dina.cli import main

    save_rng_state = Trainer._save_rng_state

    def killed_at_step_2(self, output_dir):  # after the weights and optimizer, before the trainer state
        if self.state.global_step == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        save_rng_state(self, output_dir)

    Trainer._save_rng_state = killed_at_step_2
    main(["train", "--config", sys.argv[1]])
    """
)


def test_resume_after_kill_9_mid_save_skips_the_broken_checkpoint(config_for, reference_run, tmp_path, caplog):
    run = tmp_path / "killed"
    config = config_for(run)
    # one intra-op thread, as this process runs (conftest): another thread count changes float reduction order
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", KILLED_WHILE_SAVING, config], env=env, capture_output=True, timeout=600
    )
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    assert (run / "checkpoint-2" / "model.safetensors").is_file()  # half a checkpoint: the one `--resume` used to pick
    assert not (run / "checkpoint-2" / "trainer_state.json").exists()
    assert not (run / "checkpoint-2" / COMPLETE_NAME).exists()

    with caplog.at_level(logging.WARNING, logger="modeling_dina.training.checkpoints"):
        main(["train", "--config", config, "--resume"])
    assert f"skipping {run / 'checkpoint-2'}: no {COMPLETE_NAME} (the save was interrupted)" in caplog.text
    assert f"resuming from {run / 'checkpoint-1'}" in caplog.text
    assert json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    assert_identical(weights(reference_run), weights(run))  # resumed == uninterrupted


def test_a_full_disk_says_so_and_resume_skips_what_it_cut_short(config_for, tmp_path, monkeypatch, caplog):
    run = tmp_path / "full"
    config = config_for(run, max_steps=2)
    save_file = modeling.save_file

    def disk_fills_at_the_second_checkpoint(state, path, **kwargs):
        if "checkpoint-2" in path:
            raise OSError(errno.ENOSPC, "No space left on device")
        save_file(state, path, **kwargs)

    monkeypatch.setattr(modeling, "save_file", disk_fills_at_the_second_checkpoint)
    with pytest.raises(OSError, match=r"is full .* MiB free\) while writing: free space, then rerun with --resume"):
        main(["train", "--config", config])
    monkeypatch.setattr(modeling, "save_file", save_file)
    assert (run / "checkpoint-2").is_dir() and not (run / "checkpoint-2" / COMPLETE_NAME).exists()
    with caplog.at_level(logging.WARNING, logger="modeling_dina.training.checkpoints"):
        main(["train", "--config", config, "--resume"])
    assert f"skipping {run / 'checkpoint-2'}" in caplog.text
    assert (run / "checkpoint-2" / COMPLETE_NAME).is_file()  # redone from checkpoint-1


def test_no_complete_checkpoint_is_a_clear_error(config_for, tmp_path):
    run = tmp_path / "broken"
    (run / "checkpoint-5").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=f"checkpoint-5: no {COMPLETE_NAME}"):
        main(["train", "--config", config_for(run), "--resume"])


def test_one_run_per_output_folder(config_for, reference_run, tmp_path):
    before = weights(reference_run)
    with pytest.raises(FileExistsError, match="already holds .*--resume.*--overwrite-output-dir"):
        main(["train", "--config", config_for(reference_run)])
    assert_identical(before, weights(reference_run))  # the earlier run is untouched

    busy = tmp_path / "busy"
    with exclusive_lock(str(busy), "a test"):  # another run holds the folder
        with pytest.raises(RuntimeError, match=f"in use by pid {os.getpid()}"):
            main(["train", "--config", config_for(busy)])
    main(["train", "--config", config_for(busy, max_steps=1)])  # free again once the holder is gone
    main(["train", "--config", config_for(busy, max_steps=1), "--overwrite-output-dir"])
    assert (busy / "checkpoint-1" / COMPLETE_NAME).is_file()
