"""GPT-2 as llm.c builds it: tied embeddings, tanh-GELU, vocab padded to 50304, llm.c's init.

The loss never materialises the full (B*T, V) logits: `fused_cross_entropy` walks the rows in chunks and,
like llm.c's fused classifier, computes the gradients during the forward pass (the loss is the last op,
so its incoming gradient is a known scalar), which also avoids recomputing the logits in backward.
Padded vocab rows are masked to -inf, so they never win a softmax and never receive gradient.

Recompute (llm.c `-r`): 0 stores every activation; 1 stores the MLP's pre-GELU input instead of its
GELU output and recomputes GELU in backward; 2 additionally stores the LayerNorm inputs instead of the
normalised activations that feed `c_attn`/`c_fc`, recomputing both LayerNorms in backward. Neither
recomputes a matmul, so the cost is a few elementwise passes.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

GPT2_VOCAB = 50257
PADDED_VOCAB = 50304  # next multiple of 128: tensor-core friendly lm_head
PRESETS = {"d6": (6, 6, 384), "d12": (12, 12, 768), "d24": (24, 16, 1024), "d36": (36, 20, 1280),
           "d48": (48, 25, 1600)}
_EXPLICIT = re.compile(r"^L(\d+)H(\d+)C(\d+)$", re.IGNORECASE)
# Rows of the classifier handled per chunk: 64Mi fp32 logits (256 MiB) at a time, large enough for
# full-speed GEMMs on a GPU and small next to the activations it avoids.
_CHUNK_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int = 1024
    vocab_size: int = GPT2_VOCAB
    padded_vocab_size: int = PADDED_VOCAB

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"{self.n_embd} channels do not split into {self.n_head} heads "
                             "(channels must be a multiple of heads)")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded vocab {self.padded_vocab_size} is smaller than the vocab {self.vocab_size}")

    @classmethod
    def from_descriptor(cls, descriptor: str) -> GPTConfig:
        """`d12`-style llm.c presets or an explicit `L2H2C64` (layers, heads, channels)."""
        if descriptor in PRESETS:
            return cls(*PRESETS[descriptor])
        if not (match := _EXPLICIT.match(descriptor)):
            raise ValueError(f"-e {descriptor!r}: expected one of {', '.join(PRESETS)} or LxHyCz like L2H2C64")
        try:
            return cls(*(int(g) for g in match.groups()))
        except ValueError as err:
            raise ValueError(f"-e {descriptor!r}: {err}") from err

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def pick_device(spec: str = "auto") -> torch.device:
    """A --device flag as a device: auto = this rank's GPU if there is one (LOCAL_RANK, else the current
    one), else the CPU; a bare `cuda` gets the same index. ValueError names the flag when it cannot be."""
    try:
        device = torch.device("cuda" if spec == "auto" and torch.cuda.is_available() else
                              "cpu" if spec == "auto" else spec)
    except RuntimeError as err:
        raise ValueError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N") from err
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: no CUDA device is available here")
    if device.index is None:
        local_rank = os.environ.get("LOCAL_RANK")
        device = torch.device("cuda", int(local_rank) if local_rank else torch.cuda.current_device())
    if device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (fp32 master weights, bf16 matmuls); plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on `x`'s device run in: the autocast dtype when autocast is on."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _GeluLinear(torch.autograd.Function):
    """linear(gelu(h)) saving h rather than gelu(h); GELU is recomputed in backward (llm.c -r 1)."""

    @staticmethod
    def forward(ctx, h, weight, bias):
        ctx.save_for_backward(h, weight)
        return F.linear(F.gelu(h, approximate="tanh"), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        h, weight = ctx.saved_tensors
        g = F.gelu(h, approximate="tanh")
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_weight = grad_2d.t() @ g.reshape(-1, g.shape[-1])
        grad_g = grad_out @ weight
        grad_h = torch.ops.aten.gelu_backward(grad_g, h, approximate="tanh")
        return grad_h, grad_weight, grad_2d.sum(0)


class _LayerNormLinear(torch.autograd.Function):
    """linear(layer_norm(x)) saving x and its statistics rather than the normalised x (llm.c -r 2)."""

    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, weight, bias, eps):
        shape = [x.shape[-1]]
        normed, mean, rstd = torch.ops.aten.native_layer_norm(x, shape, ln_weight, ln_bias, eps)
        ctx.save_for_backward(x, ln_weight, ln_bias, weight, mean, rstd)
        ctx.eps = eps
        return F.linear(normed.to(weight.dtype), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, ln_weight, ln_bias, weight, mean, rstd = ctx.saved_tensors
        shape = [x.shape[-1]]
        normed = torch.ops.aten.native_layer_norm(x, shape, ln_weight, ln_bias, ctx.eps)[0].to(weight.dtype)
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_weight = grad_2d.t() @ normed.reshape(-1, normed.shape[-1])
        grad_normed = (grad_out @ weight).to(x.dtype)
        grad_x, grad_ln_weight, grad_ln_bias = torch.ops.aten.native_layer_norm_backward(
            grad_normed, x, shape, mean, rstd, ln_weight, ln_bias, [True, True, True]
        )
        return grad_x, grad_ln_weight, grad_ln_bias, grad_weight, grad_2d.sum(0), None


def _rows_per_chunk(padded_vocab: int) -> int:
    return max(1, _CHUNK_ELEMENTS // padded_vocab)


def _chunk_logits(x: torch.Tensor, weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    logits = (x @ weight.t()).float()
    logits[:, vocab_size:] = float("-inf")
    return logits


def _chunked_loss_no_grad(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          vocab_size: int) -> torch.Tensor:
    dtype = compute_dtype(x)
    x, weight = x.to(dtype), weight.to(dtype)
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    step = _rows_per_chunk(weight.shape[0])
    for start in range(0, x.shape[0], step):
        logits = _chunk_logits(x[start:start + step], weight, vocab_size)
        target = targets[start:start + step, None]
        total += (torch.logsumexp(logits, 1) - logits.gather(1, target).squeeze(1)).sum()
    return total / x.shape[0]


class _FusedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (x @ weight.T) with gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size):
        dtype = compute_dtype(x)
        xc, wc = x.to(dtype), weight.to(dtype)
        rows = x.shape[0]
        grad_x = torch.empty_like(x)
        grad_weight = None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        step = _rows_per_chunk(weight.shape[0])
        for start in range(0, rows, step):
            x_chunk = xc[start:start + step]
            logits = _chunk_logits(x_chunk, wc, vocab_size)
            target = targets[start:start + step, None]
            lse = torch.logsumexp(logits, 1, keepdim=True)
            total += (lse.squeeze(1) - logits.gather(1, target).squeeze(1)).sum()
            # d(mean loss)/d(logits) = (softmax - onehot) / rows, built in place over the logits.
            probs = logits.sub_(lse).exp_()
            probs.scatter_add_(1, target, torch.full_like(target, -1, dtype=probs.dtype))
            grad_logits = probs.mul_(1.0 / rows).to(dtype)
            grad_x[start:start + step] = grad_logits @ wc
            chunk_grad_weight = grad_logits.t() @ x_chunk
            if grad_weight is None:  # no zero-filled (V, C) buffer: the first chunk's product is the start
                grad_weight = chunk_grad_weight.to(weight.dtype)
            else:
                grad_weight += chunk_grad_weight
        ctx.grads = grad_x, grad_weight  # not save_for_backward: backward hands them over and drops them
        return total / rows

    @staticmethod
    def backward(ctx, grad_loss):
        # Scaled in place and released from ctx, so autograd holds the only reference and can add the
        # embedding's gradient into this buffer and adopt it as .grad instead of allocating another (V, C).
        grad_x, grad_weight = ctx.grads
        del ctx.grads
        return grad_x.mul_(grad_loss), grad_weight.mul_(grad_loss), None, None


def fused_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        vocab_size: int) -> torch.Tensor:
    """Mean cross-entropy of `x @ weight.T` over the first `vocab_size` columns, for 2-D `x`."""
    targets = targets.reshape(-1).long()
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _FusedCrossEntropy.apply(x, weight, targets, vocab_size)
    return _chunked_loss_no_grad(x, weight, targets, vocab_size)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, recompute: int):
        super().__init__()
        channels = config.n_embd
        self.n_head = config.n_head
        self.recompute = recompute
        self.ln_1 = nn.LayerNorm(channels)
        self.c_attn = nn.Linear(channels, 3 * channels)
        self.attn_proj = nn.Linear(channels, channels)
        self.ln_2 = nn.LayerNorm(channels)
        self.c_fc = nn.Linear(channels, 4 * channels)
        self.mlp_proj = nn.Linear(4 * channels, channels)

    def _norm_linear(self, x: torch.Tensor, norm: nn.LayerNorm, linear: nn.Linear) -> torch.Tensor:
        if self.recompute < 2 or not torch.is_grad_enabled():
            return linear(norm(x))
        dtype = compute_dtype(x)
        return _LayerNormLinear.apply(x, norm.weight, norm.bias, linear.weight.to(dtype),
                                      linear.bias.to(dtype), norm.eps)

    def _gelu_linear(self, h: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
        if self.recompute < 1 or not torch.is_grad_enabled():
            return linear(F.gelu(h, approximate="tanh"))
        return _GeluLinear.apply(h, linear.weight.to(h.dtype), linear.bias.to(h.dtype))

    def _attention(self, qkv: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        batch, seq, three_c = qkv.shape
        head_dim = three_c // (3 * self.n_head)
        q, k, v = qkv.view(batch, seq, 3, self.n_head, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if attention_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        return y.transpose(1, 2).reshape(batch, seq, three_c // 3)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn_proj(self._attention(self._norm_linear(x, self.ln_1, self.c_attn), attention_mask))
        return x + self._gelu_linear(self._norm_linear(x, self.ln_2, self.c_fc), self.mlp_proj)


class GPT(nn.Module):
    """`model(idx)` -> logits (B, T, 50257); `model(idx, targets)` -> mean cross-entropy loss."""

    def __init__(self, config: GPTConfig, recompute: int = 0, seed: int = 42):
        """`recompute` is llm.c's -r level (see the module docstring); `seed` fixes the init."""
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.h = nn.ModuleList(Block(config, recompute) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self._init_weights(seed)

    def _init_weights(self, seed: int) -> None:
        """llm.c: N(0, 0.02) weights, residual projections scaled by 1/sqrt(2L), zero biases.

        Padded vocab rows start at zero, as in llm.c, and stay there: they get no gradient.
        """
        generator = torch.Generator().manual_seed(seed)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith(("attn_proj.weight", "mlp_proj.weight")):
                    param.normal_(0.0, residual_std, generator=generator)
                elif param.dim() == 2:
                    param.normal_(0.0, 0.02, generator=generator)
                elif ".ln_" in name or name.startswith("ln_f"):
                    param.fill_(1.0 if name.endswith("weight") else 0.0)
                else:
                    param.zero_()
            self.wte.weight[self.config.vocab_size:].zero_()

    @classmethod
    def from_weights(cls, config: GPTConfig, weights: dict[str, torch.Tensor], recompute: int = 0) -> GPT:
        """The model holding `weights`, built on the meta device so no random init is spent on it."""
        with torch.device("meta"):
            model = cls(config, recompute)
        model.load_state_dict(weights, assign=True)
        return model

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def compile_blocks(self) -> None:
        """torch.compile each block in place (regional compile: fast to build, state_dict keys unchanged)."""
        for block in self.h:
            block.compile()

    def hidden_states(self, idx: torch.Tensor, positions: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final LayerNorm's output. By default position t attends to 0..t; packed layouts (several
        sequences sharing a prefix, as the HellaSwag scorer uses) pass their own position ids and a boolean
        mask (B, 1, T, T), True where a query may attend to a key."""
        if positions is None:
            positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(positions)
        for block in self.h:
            x = block(x, attention_mask)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        x = self.hidden_states(idx)
        if targets is None:
            return F.linear(x, self.wte.weight[: self.config.vocab_size])
        return fused_cross_entropy(x.reshape(-1, x.shape[-1]), self.wte.weight, targets,
                                   self.config.vocab_size)
