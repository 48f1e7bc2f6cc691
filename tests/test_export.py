"""Interop: llm.c model .bin round trip and layout, Hugging Face export, training from an llm.c file."""

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from gpt2.checkpoint import load_part
from gpt2.interop import LLMC_MAGIC, LlmcFormatError, read_llmc, write_llmc
from gpt2.model import GPT, GPT2_VOCAB, PADDED_VOCAB, GPTConfig
from tests.helpers import make_shards, run_cli, tiny_config
from training.export import main
from training.train import train


@pytest.fixture()
def model() -> GPT:
    model = GPT(GPTConfig.from_descriptor("L2H2C64"))
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.normal_(0, 0.1)
    return model


def test_llmc_fp32_round_trip_and_layout(model, tmp_path):
    path = tmp_path / "model_00000000.bin"
    write_llmc(model, path)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert list(header[:8]) == [LLMC_MAGIC, 3, 1024, GPT2_VOCAB, 2, 2, 64, PADDED_VOCAB]
    assert not header[8:].any()
    assert path.stat().st_size == 1024 + 4 * model.num_parameters()
    body = np.fromfile(path, dtype="<f4", offset=1024)
    c = 64
    assert np.array_equal(body[: PADDED_VOCAB * c], model.wte.weight.detach().numpy().ravel())
    # llm.c groups each block tensor across layers: ln_1.weight of layer 0 then of layer 1, then ln_1.bias...
    ln1 = PADDED_VOCAB * c + 1024 * c
    assert np.array_equal(body[ln1 + c: ln1 + 2 * c], model.h[1].ln_1.weight.detach().numpy())
    assert np.array_equal(body[ln1 + 2 * c: ln1 + 3 * c], model.h[0].ln_1.bias.detach().numpy())
    assert np.array_equal(body[-c:], model.ln_f.bias.detach().numpy())
    loaded = read_llmc(path)
    assert loaded.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), model.parameters(), strict=True))


def test_llmc_bf16_round_trip(model, tmp_path):
    path = tmp_path / "model.bin"
    write_llmc(model, path, torch.bfloat16)
    assert np.fromfile(path, dtype="<i4", count=2)[1] == 5
    assert path.stat().st_size == 1024 + 2 * model.num_parameters()
    loaded = read_llmc(path)
    for a, b in zip(loaded.parameters(), model.parameters(), strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b.detach().to(torch.bfloat16).float())


def test_bad_llmc_files_are_refused(model, tmp_path):
    path = tmp_path / "model.bin"
    write_llmc(model, path)
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(LlmcFormatError, match="truncated.bin: .* bytes, header implies"):
        read_llmc(truncated)
    shard_like = tmp_path / "shard.bin"
    shard_like.write_bytes(np.array([20240520, 1] + [0] * 254, dtype="<i4").tobytes())
    with pytest.raises(LlmcFormatError, match="bad magic 20240520"):
        read_llmc(shard_like)


def test_checkpoint_exports_to_transformers_and_llmc(tmp_path):
    data = make_shards(tmp_path / "shards")
    train(tiny_config(data, tmp_path / "run", max_steps=2, val_data=""))
    checkpoint = tmp_path / "run" / "ckpt_00000002"
    main([str(checkpoint), "--llmc", str(tmp_path / "model.bin"), "--hf", str(tmp_path / "hf")])
    ours = read_llmc(tmp_path / "model.bin").eval()
    weights = load_part(checkpoint, "model.pt")
    assert all(torch.equal(p, weights[n]) for n, p in ours.state_dict().items())
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, GPT2_VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx), atol=2e-5, rtol=1e-5)


def test_training_can_start_from_an_llmc_file(model, tmp_path):
    write_llmc(model, tmp_path / "init.bin")
    data = make_shards(tmp_path / "shards")
    train(tiny_config(data, tmp_path / "run", max_steps=1, learning_rate=0.0, val_data="",
                      model=str(tmp_path / "init.bin")))
    weights = load_part(tmp_path / "run" / "ckpt_00000001", "model.pt")
    assert all(torch.equal(p, weights[n]) for n, p in model.state_dict().items())


def test_sample_takes_a_prompt_holding_the_document_separator(model, tmp_path):
    """<|endoftext|> in --prompt is the EOT token the model was trained on (as nanoGPT's sample.py reads it), not
    a tiktoken error with a traceback; greedy samples depend on the prompt alone."""
    path = tmp_path / "model.bin"
    write_llmc(model, path)
    argv = [str(path), "-g", "4", "--temperature", "0", "--device", "cpu", "--prompt", "<|endoftext|>The model"]
    first, again = run_cli("training/sample.py", argv), run_cli("training/sample.py", argv)
    assert first.returncode == 0 and not first.stderr, first.stderr
    (text,) = [line for line in first.stdout.splitlines() if not line.startswith("--- sample")][:1]
    assert text.startswith("<|endoftext|>The model") and first.stdout == again.stdout
