"""The GPT-2 model: llm.c shapes and init, equality with transformers, fused classifier, recompute."""

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from gpt2 import model as model_module
from gpt2.interop import to_hf
from gpt2.model import GPT, GPT2_VOCAB, PADDED_VOCAB, GPTConfig, fused_cross_entropy

TINY = GPTConfig.from_descriptor("L2H2C64")


def tiny_model(recompute: int = 0, seed: int = 42) -> GPT:
    model = GPT(TINY, recompute, seed)
    with torch.no_grad():  # non-trivial LayerNorm/bias values so every parameter matters in comparisons
        generator = torch.Generator().manual_seed(seed + 1)
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def test_presets_and_parameter_count_match_llmc():
    shapes = {d: (c.n_layer, c.n_head, c.n_embd) for d in ("d6", "d12", "d24", "d36", "d48")
              for c in [GPTConfig.from_descriptor(d)]}
    assert shapes == {"d6": (6, 6, 384), "d12": (12, 12, 768), "d24": (24, 16, 1024), "d36": (36, 20, 1280),
                      "d48": (48, 25, 1600)}
    with torch.device("meta"):
        d12 = GPT(GPTConfig.from_descriptor("d12"))
    assert d12.num_parameters() == 124_475_904  # llm.c's "num_parameters" for d12 (padded vocab)
    assert (TINY.n_layer, TINY.n_head, TINY.n_embd, TINY.block_size) == (2, 2, 64, 1024)
    for bad in ("d13", "L2H3C64", "gpt2", "L0H1C8"):
        with pytest.raises(ValueError, match="-e"):
            GPTConfig.from_descriptor(bad)


def test_init_follows_llmc_and_is_seeded():
    model = GPT(GPTConfig.from_descriptor("L4H2C128"))
    assert torch.equal(model.wte.weight[GPT2_VOCAB:], torch.zeros(PADDED_VOCAB - GPT2_VOCAB, 128))
    assert model.wte.weight[:GPT2_VOCAB].std().item() == pytest.approx(0.02, rel=0.02)
    residual = torch.cat([b.mlp_proj.weight.flatten() for b in model.h])
    assert residual.std().item() == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.03)
    assert model.h[0].c_fc.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert torch.equal(model.h[1].ln_2.weight, torch.ones(128)) and not model.h[1].c_attn.bias.any()
    again, other = GPT(model.config), GPT(model.config, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))
    assert not torch.equal(model.h[0].c_attn.weight, other.h[0].c_attn.weight)


def test_logits_equal_transformers_gpt2():
    ours = tiny_model().eval()
    theirs = to_hf(ours)
    idx = torch.randint(0, GPT2_VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_logits, their_logits = ours(idx), theirs(idx).logits
    assert ours_logits.shape == (2, 24, GPT2_VOCAB)
    torch.testing.assert_close(ours_logits, their_logits, atol=2e-5, rtol=1e-5)
    loss = ours(idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(loss, F.cross_entropy(their_logits[:, :-1].reshape(-1, GPT2_VOCAB),
                                                     idx[:, 1:].reshape(-1)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_elements", [1 << 26, 3 * PADDED_VOCAB])  # one chunk; many, uneven
def test_fused_classifier_equals_plain_loss_and_grads(monkeypatch, chunk_elements):
    monkeypatch.setattr(model_module, "_CHUNK_ELEMENTS", chunk_elements)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(37, 64, generator=generator, requires_grad=True)
    weight = (torch.randn(PADDED_VOCAB, 64, generator=generator) * 0.1).requires_grad_()
    targets = torch.randint(0, GPT2_VOCAB, (37,), generator=generator)
    fused = fused_cross_entropy(x, weight, targets, GPT2_VOCAB)
    (fused * 3.0).backward()  # a non-unit incoming gradient must scale both grads
    fused_grads = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    plain = F.cross_entropy(x @ weight[:GPT2_VOCAB].t(), targets)
    (plain * 3.0).backward()
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fused_grads[0], x.grad, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(fused_grads[1], weight.grad, atol=1e-7, rtol=1e-5)
    assert not fused_grads[1][GPT2_VOCAB:].any()  # padded rows get no gradient
    with torch.no_grad():
        torch.testing.assert_close(fused_cross_entropy(x, weight, targets, GPT2_VOCAB), plain, atol=1e-6, rtol=1e-6)


def test_padded_vocab_rows_get_no_probability_or_gradient():
    model = tiny_model()
    with torch.no_grad():
        model.wte.weight[GPT2_VOCAB:] = 50.0  # would dominate every softmax if it took part
    idx = torch.randint(0, GPT2_VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    assert model(idx).shape[-1] == GPT2_VOCAB
    loss = model(idx, idx)
    assert loss.item() < 20  # with the padded rows in play the loss would be ~50*|x| larger
    loss.backward()
    assert not model.wte.weight.grad[GPT2_VOCAB:].any()


def test_recompute_levels_give_the_same_loss_and_grads():
    idx = torch.randint(0, GPT2_VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    results = []
    for level in (0, 1, 2):
        model = tiny_model(recompute=level)
        loss = model(idx, idx.roll(1, 1))
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], atol=0, rtol=0)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, results[0][1][name], atol=1e-7, rtol=1e-5, msg=name)


@pytest.mark.parametrize("recompute", [0, 2])
def test_bf16_autocast_path_tracks_fp32(recompute):
    """The GPU precision path (bf16 autocast over fp32 weights), exercised with CPU autocast."""
    idx = torch.randint(0, GPT2_VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    reference = tiny_model(recompute)
    reference(idx, idx.roll(1, 1)).backward()
    model = tiny_model(recompute)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx.roll(1, 1))
    loss.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference(idx, idx.roll(1, 1)).detach(), atol=0.05, rtol=0.01)
    for (name, param), ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert param.grad.dtype == torch.float32, name
        cosine = F.cosine_similarity(param.grad.flatten(), ref.grad.flatten(), dim=0)
        assert cosine > 0.98, (name, cosine)
    assert not model.wte.weight.grad[GPT2_VOCAB:].any()


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="Inductor's CPU backend needs a C++ compiler")
def test_compiled_blocks_match_eager_with_recompute():
    """The CUDA default compiles the blocks; Inductor must trace the recompute autograd Functions."""
    idx = torch.randint(0, GPT2_VOCAB, (2, 17), generator=torch.Generator().manual_seed(4))
    eager, compiled = tiny_model(recompute=2), tiny_model(recompute=2)
    compiled.compile_blocks()
    for model in (eager, compiled):
        model(idx[:, :-1], idx[:, 1:]).backward()
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep their keys
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-4, msg=name)
