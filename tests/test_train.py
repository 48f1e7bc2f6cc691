"""The training loop: schedule, batching, grad accumulation, data streams, logs, hooks, DDP/ZeRO."""

import math
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gpt2.checkpoint import load_part
from gpt2.model import GPT, GPTConfig
from tests.helpers import final_weights, make_shards, tiny_config
from training.config import ConfigError, build_parser, parse_args
from training.data import ShardLoader
from training.metrics import flops_per_token, mfu, peak_flops
from training.outliers import WINDOW, OutlierDetector
from training.schedule import learning_rate
from training.train import TrainHooks, main, train


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"))


def test_learning_rate_schedules_at_key_steps():
    lr = lambda step, kind, q=0.1: learning_rate(step, 6e-4, 10, 110, q, kind)  # noqa: E731
    assert lr(0, "cosine") == pytest.approx(6e-5) and lr(4, "cosine") == pytest.approx(3e-4)
    assert lr(9, "cosine") == pytest.approx(6e-4) and lr(10, "cosine") == pytest.approx(6e-4)
    assert lr(60, "cosine") == pytest.approx((6e-4 + 6e-5) / 2)
    assert lr(35, "cosine") == pytest.approx(6e-5 + 0.5 * (1 + math.cos(math.pi / 4)) * 5.4e-4)
    assert lr(110, "cosine") == pytest.approx(6e-5)
    assert lr(60, "linear") == pytest.approx((6e-4 + 6e-5) / 2) and lr(110, "linear") == pytest.approx(6e-5)
    assert lr(0, "constant") == pytest.approx(6e-5) and lr(80, "constant") == 6e-4
    assert lr(80, "cosine", q=1.0) == pytest.approx(6e-4)  # llm.c's default -q 1.0: no decay


def test_micro_batches_accumulate_to_the_full_batch_gradient():
    model = GPT(GPTConfig.from_descriptor("L2H2C64"))
    idx = torch.randint(0, 50257, (4, 17), generator=torch.Generator().manual_seed(0))
    model(idx[:, :-1], idx[:, 1:]).backward()
    whole = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for half in (idx[:2], idx[2:]):
        (model(half[:, :-1], half[:, 1:]) / 2).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, whole[name], atol=1e-7, rtol=1e-5, msg=name)


def test_grad_accumulation_in_the_loop_matches_one_big_batch(data, tmp_path):
    runs = {}
    for name, micro_batch in (("big", 4), ("accum", 2)):
        runs[name] = []
        hooks = TrainHooks(on_step=lambda m, seen=runs[name]: seen.append(m) if "loss" in m else None)
        train(tiny_config(data, tmp_path / name, micro_batch=micro_batch, total_batch_tokens=64, max_steps=3), hooks)
    for big, accum in zip(runs["big"], runs["accum"], strict=True):  # the grad norm sees a missing 1/accum
        assert accum["loss"] == pytest.approx(big["loss"], rel=1e-6)
        assert accum["norm"] == pytest.approx(big["norm"], rel=1e-5)
    big, accum = final_weights(tmp_path / "big"), final_weights(tmp_path / "accum")
    for name in big:
        # Adam rescales float noise in exactly-zero gradients (attention key bias) to lr-sized steps,
        # so weights agree to well under one update of lr 1e-3, not to float precision.
        torch.testing.assert_close(accum[name], big[name], atol=1e-4, rtol=1e-4, msg=name)


def test_tiny_model_overfits_one_batch(data):
    losses = []
    hooks = TrainHooks(on_step=lambda m: losses.append(m["loss"]) if "loss" in m else None)
    train(tiny_config(data, None, overfit_single_batch=1, max_steps=60, learning_rate=3e-3, val_data=""), hooks)
    assert losses[0] > 10 and losses[-1] < 0.2, losses[::10]


def test_ranks_read_disjoint_slices_of_one_permuted_stream(data):
    pattern = str(data / "*_train_*.bin")
    single = ShardLoader(pattern, "-i", 4, 16, seed=3)
    ranks = [ShardLoader(pattern, "-i", 2, 16, rank=r, world=2, seed=3) for r in (0, 1)]
    seen = set()
    for _ in range(single.batches_per_epoch):
        inputs, targets = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), inputs)
        assert torch.equal(torch.cat([p[1] for p in parts]), targets)
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        seen.update(tuple(row.tolist()) for row in inputs)
    assert len(seen) == 4 * single.batches_per_epoch  # no sequence twice within an epoch
    single.next_batch()
    assert single.epoch == 1
    replay = ShardLoader(pattern, "-i", 4, 16, seed=3)
    replay.load_state_dict(single.state_dict())
    assert torch.equal(replay.next_batch()[0], single.next_batch()[0])
    fresh = ShardLoader(pattern, "-i", 4, 16, seed=3)
    epoch0_first = fresh.next_batch()[0]
    fresh.epoch, fresh.shard_pos, fresh.seq_pos = 1, 0, 0
    assert not torch.equal(fresh.next_batch()[0], epoch0_first)  # a new permutation each epoch


def test_bad_input_gives_one_line_errors_naming_the_flag(data, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"-d 100 .*-b 2 x -t 16"):
        train(tiny_config(data, None, total_batch_tokens=100))
    with pytest.raises(ConfigError, match="-i .*no files match"):
        train(tiny_config(data, None, train_data=str(tmp_path / "none_*.bin")))
    with pytest.raises(ConfigError, match="-k"):
        train(tiny_config(data, None, lr_schedule="wsd"))
    with pytest.raises(ConfigError, match="-e 'd7'"):
        train(tiny_config(data, None, model="d7"))
    assert main(["-i", str(tmp_path / "nothing*.bin"), "-e", "L2H2C64", "-t", "16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: -i ") and err.count("\n") == 1


def test_cli_keeps_llmc_flags_and_leaves_h_free():
    config = parse_args(["-i", "a*", "-j", "", "-e", "d24", "-b", "8", "-t", "512", "-d", "8192", "-l", "6e-4",
                         "-q", "0", "-u", "700", "-k", "linear", "-c", "0.1", "-x", "5", "-v", "100", "-m", "3",
                         "-s", "0", "-g", "32", "-n", "50", "-nk", "2", "-y", "1", "-r", "2", "-z", "1",
                         "-sl", "5", "-sg", "4", "-ge", "0", "-a", "1", "-o", "out"])
    assert (config.model, config.micro_batch, config.seq_len, config.total_batch_tokens) == ("d24", 8, 512, 8192)
    assert (config.learning_rate, config.final_lr_frac, config.warmup_steps, config.lr_schedule) == (
        6e-4, 0.0, 700, "linear")
    assert (config.checkpoints_keep, config.recompute, config.zero_stage, config.skip_grad_z) == (2, 2, 1, 4.0)
    assert parse_args(["--micro-batch", "3"]).micro_batch == 3
    defaults = parse_args([])
    assert (defaults.micro_batch, defaults.seq_len, defaults.learning_rate, defaults.val_every,
            defaults.recompute, defaults.final_lr_frac) == (4, 1024, 3e-4, 20, 1, 1.0)
    assert "-h" not in build_parser()._option_string_actions  # llm.c's HellaSwag flag, added later


def test_mfu_uses_llmc_flops_and_refuses_unknown_devices():
    d12 = GPTConfig.from_descriptor("d12")
    assert flops_per_token(124_475_904, d12, 1024) == 6 * 124_475_904 + 6 * 12 * 768 * 1024
    assert peak_flops("NVIDIA H100 80GB HBM3", bf16=True) == 989e12
    assert peak_flops("NVIDIA H200", bf16=True) == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", bf16=True) == 312e12
    assert peak_flops("NVIDIA H100 PCIe", bf16=True) == 756e12
    assert peak_flops("NVIDIA GeForce RTX 4090", bf16=True) is None
    assert peak_flops(None, bf16=False) is None and mfu(1e6, 10**9, None) is None
    assert mfu(1e5, 10**9, 1e15) == pytest.approx(0.1)


def test_outlier_detector_scores_against_a_full_window():
    detector = OutlierDetector()
    scores = [detector.update(1.0 + 0.01 * (i % 2)) for i in range(WINDOW)]
    assert all(math.isnan(s) for s in scores)
    assert abs(detector.update(1.005)) < 1 and detector.update(5.0) > 10
    assert OutlierDetector(detector.state()).window == detector.window


def test_main_log_is_llmc_format_and_hooks_see_every_step(data, tmp_path):
    steps, checkpoints = [], []
    hooks = TrainHooks(on_step=steps.append, on_checkpoint=lambda s, p: checkpoints.append((s, p)))
    result = train(tiny_config(data, tmp_path, max_steps=4, checkpoint_every=2), hooks)
    lines = (tmp_path / "main.log").read_text().splitlines()
    assert all(re.fullmatch(r"s:\d+ (trl:\S+ lr:\S+ norm:\S+|tel:\S+)", line) for line in lines), lines
    assert [line.split()[0] for line in lines if "trl" in line] == ["s:0", "s:1", "s:2", "s:3"]
    assert [line.split()[0] for line in lines if "tel" in line] == ["s:0", "s:2", "s:4"]
    assert [m["step"] for m in steps] == [0, 1, 2, 3, 4] and "val_loss" in steps[-1]
    assert {"loss", "norm", "lr", "ms", "tokens_per_second", "mfu"} <= steps[0].keys()
    assert steps[0]["mfu"] is None  # CPU: no honest peak to compare with
    assert [s for s, _ in checkpoints] == [2, 4] and all((p / "state.json").exists() for _, p in checkpoints)
    assert result.checkpoint == checkpoints[-1][1] and result.steps == 4


def test_one_epoch_is_the_default_length(data):
    config = tiny_config(data, None, max_steps=-1, val_data="", micro_batch=8, seq_len=64,
                         total_batch_tokens=1024)
    seen = []
    train(config, TrainHooks(on_step=seen.append))
    per_shard = (4000 - 1) // 64 // 8  # global batches per train shard
    assert len(seen) == (2 * per_shard) // 2  # two train shards, two micro-steps per step


def _init_single_rank_group(tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)


def test_ddp_and_zero1_paths_match_plain_training(data, tmp_path):
    plain = tmp_path / "plain"
    train(tiny_config(data, plain, max_steps=4, weight_decay=0.1))
    _init_single_rank_group(tmp_path)
    try:
        zero = tmp_path / "zero"
        train(tiny_config(data, zero, max_steps=2, zero_stage=1, weight_decay=0.1, checkpoint_every=2))
        train(tiny_config(data, zero, max_steps=4, zero_stage=1, weight_decay=0.1, resume=1))
    finally:
        dist.destroy_process_group()
    optimizer = load_part(zero / "ckpt_00000004", "optimizer.pt")
    assert len(optimizer["state"]) == len(list(GPT(GPTConfig(2, 2, 64)).parameters()))
    for name, tensor in final_weights(plain).items():
        torch.testing.assert_close(final_weights(zero)[name], tensor, atol=1e-4, rtol=1e-4, msg=name)


def _rank_worker(rank: int, init_file: str, data: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        train(tiny_config(Path(data), Path(out), micro_batch=2, total_batch_tokens=128, max_steps=3))
    finally:
        dist.destroy_process_group()


def test_two_ranks_train_like_one_rank_with_the_combined_batch(data, tmp_path):
    mp.spawn(_rank_worker, args=(str(tmp_path / "pg"), str(data), str(tmp_path / "ddp")), nprocs=2)
    train(tiny_config(data, tmp_path / "single", micro_batch=4, total_batch_tokens=128, max_steps=3))
    single, ddp = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], atol=1e-4, rtol=1e-4, msg=name)
    assert (tmp_path / "ddp" / "main.log").read_text().count("trl") == 3  # rank 0 alone logs
