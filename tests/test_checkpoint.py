"""Checkpoints: exact resume, atomic directories, refusal of corrupt or mismatched ones, load_model."""

import re
import shutil

import pytest
import torch

from gpt2.checkpoint import CheckpointError, list_checkpoints, load_model, load_part
from tests.helpers import make_shards, tiny_config
from training.train import TrainHooks, main, train


class Crash(Exception):
    pass


def crash_after_checkpoint(at_step: int) -> TrainHooks:
    def on_checkpoint(step, path):
        if step == at_step:
            raise Crash(path)
    return TrainHooks(on_checkpoint=on_checkpoint)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


def resume_config(data, out, **overrides):
    fields = {"max_steps": 20, "checkpoint_every": 10, "warmup_steps": 3, "final_lr_frac": 0.1,
              "weight_decay": 0.1, "val_every": 5, "sample_every": 5, "gen_tokens": 4, "skip_grad_z": 50.0}
    return tiny_config(data, out, **(fields | overrides))


def samples(text: str) -> list[str]:
    return re.findall(r"generating:\n---\n(.*?)\n---", text, re.DOTALL)


def test_resume_is_bitwise_exact(data, tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(resume_config(data, straight))
    straight_samples = samples(capsys.readouterr().out)
    with pytest.raises(Crash):
        train(resume_config(data, resumed), crash_after_checkpoint(10))
    first_half = samples(capsys.readouterr().out)
    (resumed / "main.log").open("a").write("s:10 trl:9.999 lr:0 norm:0\n")  # a line the crash left behind
    train(resume_config(data, resumed, resume=1))
    second_half = samples(capsys.readouterr().out)
    assert first_half + second_half == straight_samples and len(straight_samples) == 4
    for name in ("model.pt", "optimizer.pt"):
        a, b = (load_part(run / "ckpt_00000020", name) for run in (straight, resumed))
        flat_a, flat_b = _tensors(a), _tensors(b)
        assert flat_a.keys() == flat_b.keys()
        assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), name
    assert (straight / "main.log").read_text() == (resumed / "main.log").read_text()


def _tensors(tree, prefix=""):
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list | tuple) else []
    out = {}
    for key, value in items:
        out.update(_tensors(value, f"{prefix}/{key}"))
    return out


def test_checkpoints_are_atomic_and_kept_as_asked(data, tmp_path):
    train(tiny_config(data, tmp_path, max_steps=6, checkpoint_every=2, checkpoints_keep=2))
    (tmp_path / ".ckpt_00000008.tmp-123").mkdir()  # a write that died before its rename
    (tmp_path / "ckpt_notes").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000004", "ckpt_00000006"]
    assert sorted(p.name for p in (tmp_path / "ckpt_00000006").iterdir()) == [
        "model.pt", "optimizer.pt", "rng.pt", "state.json"]


def test_load_model_rebuilds_the_model_from_the_checkpoint_alone(data, tmp_path):
    train(tiny_config(data, tmp_path, max_steps=2))
    model = load_model(tmp_path / "ckpt_00000002")
    weights = load_part(tmp_path / "ckpt_00000002", "model.pt")
    assert (model.config.n_layer, model.config.n_embd) == (2, 64)
    assert all(torch.equal(p, weights[n]) for n, p in model.state_dict().items())


@pytest.mark.parametrize("damage, message", [
    (lambda ckpt: (ckpt / "model.pt").write_bytes((ckpt / "model.pt").read_bytes()[:1000]), r"model\.pt: 1000 bytes"),
    (lambda ckpt: (ckpt / "state.json").write_text("{not json"), r"state\.json: unreadable"),
    (lambda ckpt: (ckpt / "optimizer.pt").write_bytes(b"\0" * (ckpt / "optimizer.pt").stat().st_size),
     r"optimizer\.pt: cannot be loaded, corrupt"),
    (lambda ckpt: (ckpt / "rng.pt").unlink(), r"rng\.pt: missing"),
])
def test_corrupt_checkpoints_are_refused(data, tmp_path, capsys, damage, message):
    train(tiny_config(data, tmp_path, max_steps=2))
    damage(tmp_path / "ckpt_00000002")
    with pytest.raises(CheckpointError, match=message):
        train(tiny_config(data, tmp_path, max_steps=4, resume=1))
    args = ["-i", str(data / "*_train_*.bin"), "-j", "", "-e", "L2H2C64", "-b", "2", "-t", "16", "-x", "4",
            "-o", str(tmp_path), "-y", "1"]
    assert main(args) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'ckpt_00000002'}")


def test_incompatible_checkpoints_are_refused(data, tmp_path):
    train(tiny_config(data, tmp_path, max_steps=2))
    with pytest.raises(CheckpointError, match=r"-e L2H2C32"):
        train(tiny_config(data, tmp_path, max_steps=4, resume=1, model="L2H2C32"))
    with pytest.raises(ValueError, match=r"-t 16 -> 32"):
        train(tiny_config(data, tmp_path, max_steps=4, resume=1, seq_len=32))
    shutil.rmtree(tmp_path / "ckpt_00000002")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        train(tiny_config(data, None, resume_from=str(tmp_path / "ckpt_00000002")))


def test_a_used_output_dir_needs_resume_or_overwrite(data, tmp_path, capsys):
    args = ["-i", str(data / "*_train_*.bin"), "-j", "", "-e", "L2H2C64", "-b", "2", "-t", "16", "-x", "2",
            "-s", "0", "-o", str(tmp_path)]
    assert main(args) == 0
    first_log = (tmp_path / "main.log").read_text()
    assert main(args) == 2 and "-y 1" in capsys.readouterr().err
    assert (tmp_path / "main.log").read_text() == first_log
    assert main([*args, "-y", "1", "-x", "3"]) == 0  # a longer -x continues the same run
    assert "-x 2 -> 3" in capsys.readouterr().out and list_checkpoints(tmp_path)[-1].name == "ckpt_00000003"
    assert main([*args, "--overwrite"]) == 0
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000002"]
    assert (tmp_path / "main.log").read_text() == first_log  # the same flags and seed: the same run again


def test_nan_loss_stops_train_py_naming_the_step_with_no_nan_checkpoint(data, tmp_path, capsys):
    args = ["-i", str(data / "*_train_*.bin"), "-j", "", "-e", "L2H2C64", "-b", "2", "-t", "16", "-x", "6",
            "-s", "0", "-n", "1", "-l", "1e30", "-o", str(tmp_path)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert re.match(r"error: step \d: loss is nan", err) and err.count("\n") == 1, err
    steps = [int(p.name[5:]) for p in list_checkpoints(tmp_path)]
    assert steps and max(steps) < 6  # stopped, and wrote nothing after the step that diverged
    for path in list_checkpoints(tmp_path):
        assert all(torch.isfinite(t).all() for t in load_part(path, "model.pt").values()), path
