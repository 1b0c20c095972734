"""QuaRot-style rotation: fold the norms, rotate the residual stream, rotate the MLP hidden state online.

With every pre-RMSNorm's gain folded into the Linears it feeds, RMSNorm commutes with any orthogonal Q
(||hQ|| = ||h||), so rotating the residual stream h -> hQ is exact: the embeddings and every Linear that
writes the stream (o, down) are turned by Q, and every Linear that reads it (q/k/v, gate/up, the head) by
Q^T. The MLP hidden state feeding down/fc2 is not in the residual stream, so it is rotated *online*:
down sees (x H) with weight W H. Orthogonal rotations spread a few outlier channels over all channels,
which is what lets A4 survive.

Hadamard matrices of non-power-of-two orders: SmolLM2's 576 = 16 * 36 and 1536 = 128 * 12. We build
H_n = H_m (x) H_{2^k} from a Sylvester H_{2^k} and a Paley Hadamard H_m (m = q+1 for a prime q = 3 mod 4,
or 2(q+1) for a prime q = 1 mod 4: 12, 20, 28, 36, 44, ...), which covers 576 and 1536 and most model sizes.
We prefer this to a random orthogonal matrix because (1) a Hadamard matrix spreads every coordinate evenly
(all entries +-1/sqrt(n)), which is what bounds the rotated outliers, whereas a random rotation only does so
on average; (2) the Kronecker form is applied online in O(n (m + 2^k)) by two small matmuls instead of an
O(n^2) dense product. Random signs (QuaRot's "randomized Hadamard") keep it from aligning with the data.
Only for a size with no such factorization do we fall back to a seeded Haar-random orthogonal matrix.
"""

from __future__ import annotations

import copy
import math
from functools import lru_cache

import torch
from torch import nn
from torch.nn import functional as F

from s2d.arch import describe, fold_norm_gains
from s2d.arch.families import MLP_HIDDEN_READERS, NORM_FEEDS, RESIDUAL_WRITERS
from s2d.arch.fold import input_side, output_side
from s2d.errors import S2DError
from s2d.quant.swap import set_module

# -- Hadamard matrices ----------------------------------------------------------------------------------------


def sylvester(n: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order n (a power of two), entries +-1, float64."""
    if n < 1 or n & (n - 1):
        raise S2DError(f"a Sylvester Hadamard matrix needs a power-of-two order, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % p for p in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]  # Q[i, j] = chi(j - i)


def paley(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m by Paley's construction I or II, or None if m is not of that form."""
    if m in (1, 2):
        return sylvester(m)
    if _is_prime(m - 1) and (m - 1) % 4 == 3:  # Paley I: skew conference matrix S, H = I + S
        q = m - 1
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(m, dtype=torch.float64) + s
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:  # Paley II: symmetric conference matrix
        q = m // 2 - 1
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


@lru_cache(maxsize=32)
def hadamard_factors(n: int) -> tuple[torch.Tensor, ...] | None:
    """Orthonormal factors (H_m/sqrt(m), H_2^k/sqrt(2^k)) whose Kronecker product is a Hadamard of order n."""
    two = n & -n  # the largest power of two dividing n
    for k in range(int(math.log2(two)), -1, -1):  # the smallest Paley order m first: cheapest to apply online
        m = n // 2**k
        h = paley(m)
        if h is not None:
            factors = [f / math.sqrt(f.shape[0]) for f in (h, sylvester(2**k)) if f.shape[0] > 1]
            return tuple(factors) or (torch.ones(1, 1, dtype=torch.float64),)
    return None


class Rotation(nn.Module):
    """x -> (x * signs) (A (x) B): an orthogonal map of the last dimension, applied factor by factor."""

    def __init__(self, signs: torch.Tensor, factors: list[torch.Tensor]):
        super().__init__()
        if len(factors) not in (1, 2):
            raise S2DError("a Rotation has one or two Kronecker factors")
        self.register_buffer("signs", signs.float())
        self.n_factors = len(factors)
        for i, f in enumerate(factors):
            self.register_buffer(f"factor{i}", f.float())

    @property
    def factors(self) -> list[torch.Tensor]:
        return [getattr(self, f"factor{i}") for i in range(self.n_factors)]

    @property
    def size(self) -> int:
        return self.signs.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * self.signs.to(x.dtype)
        if self.n_factors == 1:
            return y @ self.factor0.to(x.dtype)
        a, b = self.factor0.to(x.dtype), self.factor1.to(x.dtype)
        shape = y.shape
        y = y.reshape(-1, a.shape[0], b.shape[0]) @ b  # (x reshaped to (.., m, 2^k)) -> B on the last axis
        return (a.t() @ y).reshape(shape)  # then A on the middle axis: y[k, l] = sum_ij x[i, j] A[i, k] B[j, l]

    def matrix(self) -> torch.Tensor:
        """The dense n x n matrix M with forward(x) == x @ M, in float64."""
        m = self.factor0.double()
        if self.n_factors == 2:
            m = torch.kron(m, self.factor1.double())
        return self.signs.double()[:, None] * m

    @classmethod
    def skeleton(cls, size: int, factor_sizes: list[int]) -> Rotation:
        """An empty rotation of the given shapes, to load saved buffers into."""
        return cls(torch.ones(size), [torch.eye(s) for s in factor_sizes])


def random_rotation(n: int, seed: int) -> Rotation:
    """A randomized Hadamard rotation of order n (random signs), or a Haar-random orthogonal matrix as fallback."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    factors = hadamard_factors(n)
    if factors is None:
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        return Rotation(torch.ones(n), [q * torch.sign(torch.diagonal(r))])  # sign fix makes it Haar-distributed
    return Rotation(signs, list(factors))


class RotatedLinear(nn.Linear):
    """A Linear that rotates its input online: y = (x R) W^T + b, with W already turned by R."""

    def __init__(self, in_features: int, out_features: int, bias: bool, rotation: Rotation):
        super().__init__(in_features, out_features, bias=bias)
        self.rotation = rotation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.rotation(x), self.weight, self.bias)


# -- rotating a model --------------------------------------------------------------------------------------------


def check_rotatable(model: nn.Module) -> None:
    family = describe(model).family
    if family.rotation_blocker:
        raise S2DError(f"rotation is not supported for the {family.name} family: {family.rotation_blocker}. "
                       "Use SmoothQuant (--smooth) or no outlier baseline for this model")


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0, heads: bool = False) -> nn.Module:
    """Rotate `model` in place (function-preserving in exact arithmetic); returns it.

    With `heads`, also SpinQuant's R2: each attention head's values and the o_proj input of that head turned by
    the same head_dim rotation (see `rotate_heads`).
    """
    check_rotatable(model)
    desc = describe(model)
    embed = desc.module(desc.embeddings) if desc.embeddings else None
    if not isinstance(embed, nn.Embedding):
        raise S2DError(f"rotation needs a token embedding table; {desc.family.name} has {type(embed).__name__}")
    head = desc.module(desc.head) if desc.head else None
    if head is not None and head.weight is embed.weight:  # tied: the head gets its own copy, turned differently
        head.weight = nn.Parameter(head.weight.detach().clone())
        for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            cfg.tie_word_embeddings = False
    fold_norm_gains(desc)
    if desc.final_norm and head is not None:
        _fold_final_norm(desc.module(desc.final_norm), head, desc.family.norm_gain_offset)
    d = embed.weight.shape[1]
    q = random_rotation(d, seed).double()  # applied factor by factor: W Q costs O(n (m + 2^k)) per row
    turn_residual(desc, q)
    for block in desc.blocks:
        for lin in block.linears:
            if lin.role in MLP_HIDDEN_READERS:
                online = random_rotation(lin.module.in_features, seed + 1 + lin.block)
                reader = input_side(lin.module)
                name = lin.name if reader is lin.module else f"{lin.name}.{_child_name(lin.module, reader)}"
                set_module(model, name, _rotated_copy(reader, online))
    if heads:
        rotate_heads(desc, seed)
    model.s2d_rotated = True  # norms folded and the stream turned: learned rotations build on this
    return model


def residual_sides(desc) -> list[tuple[nn.Module, str]]:
    """Every weight that touches the residual stream, with the side the stream is on: "left" for the Linears
    that write it (output side), "right" for the embedding and the Linears that read it (input side).

    A low-rank pair (W = B·A) is turned on A's input side and on B's output side.
    """
    sides = [(desc.module(desc.embeddings), "right")]
    for block in desc.blocks:
        for lin in block.linears:
            if lin.role in RESIDUAL_WRITERS:
                sides.append((output_side(lin.module), "left"))
            elif any(lin.role in roles for roles in NORM_FEEDS.values()):
                sides.append((input_side(lin.module), "right"))
    if desc.head:
        sides.append((desc.module(desc.head), "right"))
    return sides


@torch.no_grad()
def turn_residual(desc, q: Rotation) -> None:
    """Rotate the residual stream h -> h Q of a model whose norms are folded (exact; see the module docstring)."""
    for module, side in residual_sides(desc):
        _turn(module, **{side: q})


@torch.no_grad()
def rotate_heads(desc, seed: int = 0) -> None:
    """R2: v -> v M within every head (v_proj's rows, head by head) and o_proj's input columns by M too.

    Attention mixes tokens, never channels, so each head's output is (A v) M and o_proj, turned by the same M on
    each head's columns, undoes it: exact for any number of query heads per KV head (GQA), since every head
    uses one M. What it buys is the o_proj input: its outlier channels are spread within each head. The
    rotation is folded into the two weights; nothing runs online. Only head_dim matters, so 9 query and 3 KV
    heads of 64 channels (SmolLM2) are as easy as any power of two.
    """
    for block in desc.blocks:
        turn_head(desc, block, random_rotation(desc.head_dim, seed + 7919 + block.index).double())


def head_sides(desc, block) -> tuple[nn.Linear, nn.Linear]:
    """(the Linear writing v, the Linear reading o's input) of a block: the two sides R2 turns."""
    roles = {lin.role: lin for lin in block.linears}
    if "v" not in roles or "o" not in roles:
        raise S2DError(f"head rotation needs separate v and o projections; {desc.family.name} block "
                       f"{block.index} has roles {', '.join(roles)}")
    v, o = output_side(roles["v"].module), input_side(roles["o"].module)
    size = desc.head_dim
    if v.weight.shape[0] % size or o.weight.shape[1] % size:
        raise S2DError(f"head_dim {size} does not divide v's outputs {v.weight.shape[0]} or o's inputs "
                       f"{o.weight.shape[1]} in block {block.index}; this model's head layout is not supported")
    return v, o


@torch.no_grad()
def turn_head(desc, block, m: Rotation) -> None:
    """R2 with the head_dim rotation `m` on one block (see `rotate_heads`)."""
    v, o = head_sides(desc, block)
    size = desc.head_dim
    w = v.weight.double().t()  # (d, heads·hd): each head's columns turned on the right, i.e. Mᵀ W_head
    v.weight.copy_(m(w.reshape(w.shape[0], -1, size)).reshape(w.shape).t().to(v.weight.dtype))
    if v.bias is not None:
        v.bias.copy_(m(v.bias.double().reshape(-1, size)).reshape(-1).to(v.bias.dtype))
    w = o.weight.double()  # (d, heads·hd): W_o blockdiag(M)
    o.weight.copy_(m(w.reshape(w.shape[0], -1, size)).reshape(w.shape).to(o.weight.dtype))


def _child_name(parent: nn.Module, child: nn.Module) -> str:
    return next(name for name, m in parent.named_children() if m is child)


def _turn(module: nn.Module, left: Rotation | None = None, right: Rotation | None = None) -> None:
    """weight <- Q^T weight (left: the output side) and/or weight Q (right: the input side); bias <- Q^T bias.

    An nn.Embedding's rows are its outputs, so it is turned on the right. Done in float64.
    """
    w = module.weight.double()
    if left is not None:
        w = left(w.t()).t()  # Q^T W = (W^T Q)^T
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(left(module.bias.double()).to(module.bias.dtype))
    if right is not None:
        w = right(w)
    module.weight.copy_(w.to(module.weight.dtype))


def _fold_final_norm(norm: nn.Module, head: nn.Linear, offset: float) -> None:
    gain = norm.weight.double() + offset
    head.weight.copy_((head.weight.double() * gain).to(head.weight.dtype))
    norm.weight.fill_(1.0 - offset)


def _rotated_copy(linear: nn.Linear, rotation: Rotation) -> RotatedLinear:
    # y = x W^T = (x M)(W M)^T for orthogonal M, so the new weight is W M.
    new = RotatedLinear(linear.in_features, linear.out_features, linear.bias is not None, rotation)
    new.weight.copy_(copy.deepcopy(rotation).double()(linear.weight.double()).to(linear.weight.dtype))
    if linear.bias is not None:
        new.bias.copy_(linear.bias)
    return new.to(linear.weight.device)

