"""Labels for the K-FAC Fisher kinds: per-example seeded draws from the model's predictive
distribution (``fisher="true"``) and square roots of the output Hessian (``fisher="exact"``).

Each example has its own generator (:func:`_example_generator`), so sampled labels do not
depend on batching or on the process an example lands on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.func import grad, jvp, vmap

from datatrace.curvature.kfac import MAX_EXACT_OUTPUTS
from datatrace.devices import working_dtype
from datatrace.errors import ConfigError
from datatrace.task import Task, _SplitBatch


def _example_generator(seed: int, index: int) -> torch.Generator:
    # One stream per example, so sampled labels do not depend on batching. The CPU generator
    # keeps 32 bits of its seed: mix (seed, index) with SplitMix64 so both change them.
    x = (seed * 0x9E3779B97F4A7C15 + index + 1) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return torch.Generator().manual_seed((x ^ (x >> 31)) % 2**63)


def _sample_labels(
    task: Task, z: torch.Tensor, split: _SplitBatch, seed: int, offset: int, samples: int = 1
) -> list[Any]:
    """``samples`` label sets drawn from the model; draw ``j`` of example ``i`` is the ``j``-th
    from example ``i``'s own stream, so the first set does not depend on ``samples``."""
    labels = split.labels
    assert labels is not None
    gens = [_example_generator(seed, offset + i) for i in range(z.shape[0])]
    if task.loss_name not in ("cross_entropy", "mse", "lm"):
        raise ConfigError(
            f"fisher='true' samples labels from the model's predictive distribution, known for "
            f"the losses 'cross_entropy', 'mse' and 'lm'; the task's loss is {task.loss_name!r}. "
            "Use fisher='empirical' or fisher='exact'."
        )
    # Draws come from the examples' CPU streams, so labels do not depend on the device: one
    # transfer of the batch's outputs (in the working dtype: no half-precision softmax).
    z_cpu, labels_cpu = z.to("cpu", working_dtype(z.dtype)), labels.to("cpu")
    if task.loss_name == "mse":
        # per example all its draws in a row: its stream, not the batch, fixes them
        per_example = [
            [_draw_mse(z_cpu[i], labels_cpu[i], g) for _ in range(samples)]
            for i, g in enumerate(gens)
        ]
        drawn_sets = [torch.stack([draws[j] for draws in per_example]) for j in range(samples)]
    else:
        drawn_sets = list(_categorical_draws(task, z_cpu, gens, samples).unbind(1))
    out = []
    for drawn in drawn_sets:
        drawn = drawn.to(z.device)
        if task.loss_name == "lm":  # position t predicts token t + 1
            full = labels.clone()
            full[:, 1:] = torch.where(
                labels[:, 1:] == -100, labels[:, 1:], drawn[:, :-1].to(labels)
            )
            drawn = full
        out.append(drawn)
    return out


_DRAW_CHUNK = 1 << 22  # float64 CDF entries per step of _categorical_draws


def _categorical_draws(
    task: Task, z: torch.Tensor, gens: list[torch.Generator], samples: int
) -> torch.Tensor:
    """``(B, samples, ...)`` labels drawn from the softmax of each example's outputs.

    Inverse-CDF sampling: example ``i`` draws ``samples x P`` uniforms from its own stream
    (``P`` = 1 categorical over all its outputs for ``cross_entropy``, one per position for
    ``lm``), in a row, so a draw depends on the example's stream only; the CDF lookups of the
    whole batch are one vectorized ``searchsorted`` (float64, chunked over examples).
    """
    b = z.shape[0]
    per = z.reshape(b, 1, -1) if task.loss_name == "cross_entropy" else z
    p, v = per.shape[1], per.shape[2]
    u = torch.stack([torch.rand(samples, p, generator=g, dtype=torch.float64) for g in gens])
    out = torch.empty(b, samples, p, dtype=torch.long)
    step = max(1, _DRAW_CHUNK // max(1, p * v))
    for lo in range(0, b, step):
        cdf = torch.softmax(per[lo : lo + step].to(torch.float64), -1).cumsum(-1)
        # first class whose CDF exceeds u: class k with probability p_k, never a zero one
        idx = torch.searchsorted(cdf, u[lo : lo + step].transpose(1, 2).contiguous(), right=True)
        out[lo : lo + step] = idx.transpose(1, 2).clamp_max(v - 1)
    return out[:, :, 0] if task.loss_name == "cross_entropy" else out


def _draw_mse(z: torch.Tensor, label: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One target for one example: ``0.5 ||z - y||²`` is the NLL of ``y ~ N(z, I)``."""
    noise = torch.randn(label.shape, generator=gen, dtype=z.dtype).to(z.device)
    return z.reshape(label.shape) + noise


def _output_hessian_sqrt(task: Task, z: torch.Tensor, split: _SplitBatch) -> torch.Tensor:
    """``(B, D, D)`` square roots ``S`` with ``S Sᵀ`` = each example's output Hessian (PSD part).

    Computed in the working dtype (a half-precision model's outputs are upcast: no
    half-precision eigensolver) and returned in the outputs' dtype, for their backward pass.
    """
    out_dtype = z.dtype
    z = z.to(working_dtype(z.dtype))
    b, d = z.shape[0], z[0].numel()
    if d > MAX_EXACT_OUTPUTS:
        raise ConfigError(
            f"fisher='exact' back-propagates one vector per output dimension, here {d} per "
            f"example (more than {MAX_EXACT_OUTPUTS}); use fisher='true'."
        )

    def loss(zz: torch.Tensor) -> torch.Tensor:
        return task.loss_from_outputs(zz, split).sum()

    # The summed loss's Hessian is block-diagonal over examples: column d of every block at once.
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    tangents = eye.unsqueeze(1).expand(d, b, d).reshape(d, *z.shape)
    cols = vmap(lambda t: jvp(grad(loss), (z,), (t,))[1])(tangents)
    h = cols.reshape(d, b, d).permute(1, 2, 0)
    evals, evecs = torch.linalg.eigh((h + h.transpose(1, 2)) / 2)
    return (evecs * evals.clamp_min(0).sqrt().unsqueeze(1)).to(out_dtype)
