"""`sdstack train ...` as a user runs it: one-line errors (exit 2) before any training, and a two-process
`accelerate launch` on the CPU that writes the same model format."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image


from .conftest import cli, tiny_t2i_config

REPO = Path(__file__).resolve().parents[2]


def _error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("body, needle", [
    ("[run]\nmax_stepz = 3\n", "unknown key 'run.max_stepz'"),
    ("[run]\nbatch_size = \"big\"\n", "run.batch_size must be int"),
    ("[data]\nsource = \"folder\"\npath = \"/nonexistent/images\"\n", "data folder not found"),
])
def test_bad_autoencoder_config_stops_with_one_line(tmp_path, capsys, body, needle):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[run]\nout = "{tmp_path / "run"}"\n' + body if "[run]" not in body else body)
    assert cli("train", "autoencoder", "--config", cfg) == 2
    assert needle in _error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_image_folder_without_captions_stops_with_one_line(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[run]\nout = "{tmp_path / "run"}"\n[data]\nsource = "folder"\npath = "{tmp_path / "imgs"}"\n'
                   '[model]\nblock_out_channels = [8, 16]\nnorm_num_groups = 8\n')
    assert cli("train", "autoencoder", "--config", cfg) == 2
    assert ".txt caption" in _error_line(capsys)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_text2image_with_missing_vae_stops_with_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'vae = "{tmp_path / "no-vae"}"\n[run]\nout = "{tmp_path / "run"}"\n')
    assert cli("train", "text2image", "--config", cfg) == 2
    assert "no trained VAE" in _error_line(capsys)


def test_no_config_and_no_resume(capsys):
    assert cli("train", "autoencoder") == 2
    assert "--config" in _error_line(capsys)


def _toml(cfg) -> str:
    from sdstack.train.config import to_toml

    return to_toml(cfg)


@pytest.mark.skipif(shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None,
                    reason="accelerate launcher not installed")
def test_accelerate_launch_two_cpu_processes(tmp_path, tiny_vae_dir):
    cfg = tiny_t2i_config(tmp_path / "run", tiny_vae_dir, max_steps=2, checkpoint_every=1, progress=True)
    (tmp_path / "c.toml").write_text(_toml(cfg))
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "-m", "sdstack", "train", "text2image", "--config", str(tmp_path / "c.toml")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"))
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "2 process(es)" in run.stdout
    assert run.stdout.count("model written to") == 1  # only the main process reports and exports

    from sdstack.models.loader import load_model

    bundle = load_model(tmp_path / "run" / "model")
    assert bundle.family == "sd1" and bundle.prediction_type == "v_prediction"


def test_stop_then_resume_from_the_run_folder_alone(tmp_path, capsys):
    from .conftest import tiny_ae_config

    (tmp_path / "c.toml").write_text(_toml(tiny_ae_config(tmp_path / "run")))
    assert cli("train", "autoencoder", "--config", tmp_path / "c.toml", "--stop-at", 1) == 0
    assert "step 1" in capsys.readouterr().out
    assert cli("train", "autoencoder", "--resume", tmp_path / "run") == 0  # the checkpoint's own config
    out = capsys.readouterr().out
    assert "step 4" in out and "model written to" in out
    assert (tmp_path / "run" / "vae" / "diffusion_pytorch_model.safetensors").is_file()


def test_set_overrides_the_config_file(tmp_path, capsys):
    from sdstack.train.config import AutoencoderConfig, load_config

    from .conftest import tiny_ae_config

    (tmp_path / "c.toml").write_text(_toml(tiny_ae_config(tmp_path / "run")))
    assert load_config(tmp_path / "c.toml", AutoencoderConfig).run.max_steps == 4
    assert cli("train", "autoencoder", "--config", tmp_path / "c.toml", "--set", "run.max_steps=2",
               "--set", "optim.lr=3e-4") == 0
    assert "step 2" in capsys.readouterr().out
    saved = load_config(tmp_path / "run" / "config.toml", AutoencoderConfig)  # the run keeps what it ran with
    assert saved.run.max_steps == 2 and saved.optim.lr == 3e-4


@pytest.mark.parametrize("item, needle", [("run.max_stepz=2", "unknown key 'run.max_stepz'"),
                                          ("run.max_steps", "--set takes KEY=VALUE")])
def test_bad_set_stops_with_one_line(tmp_path, capsys, item, needle):
    from .conftest import tiny_ae_config

    (tmp_path / "c.toml").write_text(_toml(tiny_ae_config(tmp_path / "run")))
    assert cli("train", "autoencoder", "--config", tmp_path / "c.toml", "--set", item) == 2
    assert needle in _error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None,
                    reason="accelerate launcher not installed")
def test_ctrl_c_stops_two_processes_at_one_step_with_a_checkpoint(tmp_path, tiny_vae_dir):
    """Ctrl-C reaches the launcher, which passes it on to each rank (they run in sessions of their own) one after
    the other; the ranks agree on one step, the main process writes the checkpoint there, and both exit within
    the launcher's grace period instead of hanging in a collective the other rank never joins."""
    import signal
    import time

    from sdstack.train.checkpoint import find_checkpoint

    cfg = tiny_t2i_config(tmp_path / "run", tiny_vae_dir, max_steps=100000, checkpoint_every=0,
                          checkpoint_minutes=0, log_every=1, progress=True)
    (tmp_path / "c.toml").write_text(_toml(cfg))
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "-m", "sdstack", "train", "text2image", "--config", str(tmp_path / "c.toml")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"),
               PYTHONUNBUFFERED="1")
    log = open(tmp_path / "log", "w+")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while "step 3/" not in (tmp_path / "log").read_text():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "log").read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = (tmp_path / "log").read_text()
    assert out.count("stopped at step") == 1, out[-3000:]
    stopped_at = int(out.split("stopped at step")[1].split()[0])
    assert 3 <= stopped_at < 100000
    ckpt = find_checkpoint(tmp_path / "run")
    assert ckpt.name == f"step-{stopped_at:08d}"
