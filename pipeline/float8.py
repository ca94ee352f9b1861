"""fp8 (e4m3) inference linears for the CLIP image tower: `aesthetic.precision=fp8`.

Each converted linear keeps its weight in float8 e4m3 with one scale per output channel, set once
from the bf16/fp32 weight, and quantises its input on the fly with one scale per row (token), both
scales chosen so that the row's or channel's largest magnitude maps to e4m3's largest finite value
(448). The product runs through `torch._scaled_mm` (fp8 tensor cores: compute capability 8.9+, i.e.
L4, L40S, H100; the CPU also runs it, slowly, which is what the tests use) and comes out in bf16,
which is why the rest of the tower then runs in bf16. Rowwise scales follow the usual recipe for fp8
inference of transformers: a per-tensor activation scale lets one outlier token flatten every other
token to a few e4m3 levels.

Each linear's bias is added by the GEMM itself (`_scaled_mm`'s `bias`, in its epilogue) rather than
by a kernel after it. Besides saving a pass over the output, this matters most in the attention: the
packed q/k/v projection's output then goes to SDPA as three strided views, where an add after the GEMM
made inductor write q, k and v out again as three new tensors (8% of the fp8 tower's kernel time on an
H100, BENCHMARKS.md). `fused_bias=False` keeps the add after the GEMM, the benchmark's baseline.

The GEMMs use fast accumulation (`use_fast_accum=True`: the partial sums stay in the Hopper tensor
cores' own accumulators instead of being promoted to fp32 every 128 values of K), as torchao's fp8
linears do for their forward GEMM. PyTorch's rowwise-scaled kernel (CUTLASS) is much slower without
it (pytorch/pytorch#147971 and pytorch/ao#1325 measured that on H100s), which is the likely reason
fp8 ran only 1.14x faster than fp16 in this tower on an H100 (BENCHMARKS.md). The accumulators'
precision is lower (about 22 bits); `pipeline.bench_models_gpu --fp8` measures the embeddings'
agreement with the fp16 tower beside the speed, with `fast_accum=False` as the same run's baseline.

What is converted: every `nn.Linear` and every self-attention `nn.MultiheadAttention` (its packed
in/out projections; attention itself runs in bf16 through SDPA) whose dimensions are multiples of 16,
the fp8 GEMM's alignment rule; anything else (convolutions, norms, open_clip's `proj` matrix, a
too-narrow layer) stays as it was. `PatchEmbedding` (used by `aesthetic.precision=fp8` too) runs a ViT's
patch embedding, a convolution whose stride is its kernel size, as the bf16 GEMM it is: cuDNN runs that
3-channel convolution with a kernel that does not use the tensor cores (3% of the fp8 tower's kernel
time on an H100). `FirstTokenBlock` runs a ViT's last block for the class token alone when the tower
pools that token and nothing reads the others: keys and values still come from every token, but the
attention's query, its output projection and the MLP run on one token instead of 257 (3% of
ViT-L/14's FLOPs, the same embedding). This changes what the tower computes: `pipeline.bench_models_gpu
--fp8` reports the embeddings' agreement with the fp16 tower beside the speed.

Why not torchao (whose fp8 training linears `train.float8` uses): its fp8 inference path (`quantize_`)
converts `nn.Linear` modules, while open_clip's attention keeps q, k and v in one packed parameter of
`nn.MultiheadAttention`, a quarter of the tower's linear FLOPs, which it would leave in bf16; and the
curate job's `pipeline` extra does without it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
ALIGN = 16  # torch._scaled_mm needs both GEMM dimensions of the weight to be multiples of 16


def float8_supported(device: torch.device) -> bool:
    """Whether `device` runs fp8 GEMMs: the CPU (slowly) and CUDA GPUs of compute capability 8.9+."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return False


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[m, k] -> (e4m3 [m, k], float32 scales [m, 1]) with x ~= q * scale, row by row."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def _aligned(*dims: int) -> bool:
    return all(d % ALIGN == 0 for d in dims)


class Float8Linear(nn.Module):
    """y = x @ W.T + b with W in e4m3 (per output channel scales) and x quantised per row."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        fast_accum: bool = True,
        fused_bias: bool = True,
    ):
        super().__init__()
        self.fast_accum, self.fused_bias = fast_accum, fused_bias
        out_features, in_features = weight.shape
        if not _aligned(out_features, in_features):
            raise ValueError(
                f"fp8 linear needs dimensions that are multiples of {ALIGN}, got {tuple(weight.shape)}"
            )
        q, scale = quantize_rows(weight.detach())
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_fp8", q)  # [out, in] row-major: its .t() is the column-major operand
        self.register_buffer("weight_scale", scale.reshape(1, out_features).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))

    @classmethod
    def from_linear(cls, linear: nn.Linear, fast_accum: bool = True, fused_bias: bool = True) -> Float8Linear:
        return cls(linear.weight, linear.bias, fast_accum, fused_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        q, scale = quantize_rows(x.reshape(-1, self.in_features))  # [..., in] -> [m, in]
        fused = self.bias is not None and self.fused_bias
        y = torch._scaled_mm(
            q,
            self.weight_fp8.t(),
            scale_a=scale,
            scale_b=self.weight_scale,
            bias=self.bias if fused else None,
            out_dtype=torch.bfloat16,
            use_fast_accum=self.fast_accum,
        )
        if self.bias is not None and not fused:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)  # [m, out] -> [..., out]

    def extra_repr(self) -> str:
        accum = ", fast accumulation" if self.fast_accum else ""
        bias = self.bias is not None and ("in the GEMM" if self.fused_bias else "after the GEMM")
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}, e4m3{accum}"


class Float8SelfAttention(nn.Module):
    """`nn.MultiheadAttention` for self-attention (query, key and value the same tensor) with fp8
    projections and SDPA in bf16; same call signature and mask conventions, no attention weights."""

    def __init__(self, mha: nn.MultiheadAttention, fast_accum: bool = True, fused_bias: bool = True):
        super().__init__()
        if not convertible_attention(mha):
            raise ValueError(
                "fp8 attention needs packed q/k/v projections without bias_k/bias_v or zero attention"
            )
        self.num_heads, self.batch_first = mha.num_heads, mha.batch_first
        self.in_proj = Float8Linear(mha.in_proj_weight, mha.in_proj_bias, fast_accum, fused_bias)
        self.out_proj = Float8Linear(mha.out_proj.weight, mha.out_proj.bias, fast_accum, fused_bias)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        **_: object,
    ):
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("Float8SelfAttention: self-attention only (key and value must be the query)")
        if need_weights or key_padding_mask is not None:
            raise ValueError("Float8SelfAttention: no attention weights and no key_padding_mask")
        x = query if self.batch_first else query.transpose(0, 1)
        b, n, d = x.shape
        qkv = self.in_proj(x).view(b, n, 3, self.num_heads, d // self.num_heads)  # [b, n, 3, heads, d/heads]
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [b, heads, n, d/heads], a strided view: SDPA takes it
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # nn.MultiheadAttention: True = masked; SDPA: True = attend
                attn_mask = ~attn_mask
            else:
                attn_mask = attn_mask.to(q.dtype)
            if attn_mask.dim() == 3:  # [b * heads, n, n]
                attn_mask = attn_mask.view(b, self.num_heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, d))  # [b, heads, n, d/heads] -> [b, n, d]
        return (out if self.batch_first else out.transpose(0, 1)), None

    def first_token(self, x: torch.Tensor) -> torch.Tensor:
        """The attention's output for the first token alone, x [b, n, d] (batch first) -> [b, 1, d]:
        keys and values from every token, the query and the output projection for one."""
        b, n, d = x.shape
        qkv = self.in_proj(x).view(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [b, heads, n, d/heads]
        out = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # [b, heads, 1, d/heads]
        return self.out_proj(out.transpose(1, 2).reshape(b, 1, d))


def convertible_attention(mha: nn.MultiheadAttention) -> bool:
    return (
        mha._qkv_same_embed_dim
        and mha.in_proj_weight is not None
        and mha.bias_k is None
        and mha.add_zero_attn is False
        and _aligned(mha.embed_dim, mha.head_dim)
    )


def convert_to_float8(module: nn.Module, fast_accum: bool = True, fused_bias: bool = True) -> dict[str, int]:
    """Replace, in place, the fp8-eligible linears and self-attentions under `module` (see the module
    docstring); returns how many of each were converted and how many were left as they were."""
    counts = {"linear": 0, "attention": 0, "skipped_linear": 0, "skipped_attention": 0}
    for name, child in module.named_children():
        if isinstance(child, nn.MultiheadAttention):  # its forward reads out_proj.weight: all or nothing
            if convertible_attention(child):
                setattr(module, name, Float8SelfAttention(child, fast_accum, fused_bias))
                counts["attention"] += 1
            else:
                counts["skipped_attention"] += 1
        elif isinstance(child, nn.Linear):
            if _aligned(child.in_features, child.out_features):
                setattr(module, name, Float8Linear.from_linear(child, fast_accum, fused_bias))
                counts["linear"] += 1
            else:
                counts["skipped_linear"] += 1
        else:
            for key, n in convert_to_float8(child, fast_accum, fused_bias).items():
                counts[key] += n
    return counts


class PatchEmbedding(nn.Module):
    """A ViT's patch embedding (`nn.Conv2d` with stride = kernel size, no padding, dilation or groups)
    as one GEMM: the non-overlapping patches flattened in the weight's (channel, row, column) order, times
    the flattened kernel. The same sums as the convolution, in another order; output [n, width, gh, gw]
    as the convolution's (a permuted view: the tower reshapes it to tokens next)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not patch_convolution(conv):
            raise ValueError(
                f"PatchEmbedding needs a convolution whose stride is its kernel size, got {conv}"
            )
        self.patch = conv.kernel_size
        self.weight = nn.Parameter(conv.weight.detach().flatten(1), requires_grad=False)  # [width, c*p*p]
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        ph, pw = self.patch
        gh, gw = h // ph, w // pw
        x = x[..., : gh * ph, : gw * pw]  # the convolution drops a partial last patch too
        patches = x.reshape(n, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * ph * pw)
        y = F.linear(patches, self.weight, self.bias)  # [n, gh*gw, width]
        return y.view(n, gh, gw, -1).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"patch={self.patch}, width={self.weight.shape[0]}, as a GEMM"


def patch_embeddings_as_gemms(module: nn.Module) -> int:
    """Replace, in place, every patch convolution under `module` (stride = kernel size > 1) by a
    `PatchEmbedding`; returns how many."""
    swapped = 0
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if patch_convolution(child) and child.kernel_size != (1, 1):
                setattr(parent, name, PatchEmbedding(child))
                swapped += 1
    return swapped


def patch_convolution(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.stride == conv.kernel_size
        and conv.padding in ((0, 0), "valid")
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


class FirstTokenBlock(nn.Module):
    """An open_clip `ResidualAttentionBlock` (batch first, self-attention) computed for the first token
    alone: x [b, n, d] -> [b, 1, d], what the block gives that token (module docstring)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        if attn_mask is not None:
            raise ValueError("FirstTokenBlock: no attention mask (an image tower has none)")
        blk = self.block
        h = blk.ln_1(x)
        if isinstance(blk.attn, Float8SelfAttention):
            a = blk.attn.first_token(h)
        else:
            a = blk.attn(h[:, :1], h, h, need_weights=False)[0]
        x = x[:, :1] + blk.ls_1(a)
        return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


def first_token_last_block(visual: nn.Module) -> bool:
    """Swap the last block of an open_clip image tower for a `FirstTokenBlock`, in place, when the
    tower's output reads the class token alone (pooling "tok", no attention pooling, no token output,
    batch-first blocks without a separate key/value norm). Returns whether it did."""
    transformer = getattr(visual, "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    if (
        blocks is None
        or len(blocks) == 0
        or getattr(visual, "pool_type", None) != "tok"
        or getattr(visual, "attn_pool", None) is not None
        or getattr(visual, "output_tokens", True)
        or getattr(visual, "final_ln_after_pool", False)
        or not getattr(transformer, "batch_first", False)
    ):
        return False
    last = blocks[-1]
    parts = ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2")
    if (
        isinstance(last, FirstTokenBlock)
        or not all(hasattr(last, p) for p in parts)
        or hasattr(last, "ln_1_kv")
    ):
        return False
    attn = last.attn
    if isinstance(attn, nn.MultiheadAttention) and not attn.batch_first:
        return False
    blocks[-1] = FirstTokenBlock(last)
    return True
