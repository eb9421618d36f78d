"""Random projections of per-sample gradients (DESIGN.md §4: never ``n_train x n_params``).

A projector maps a gradient ``x`` (length ``n_params``) to ``P^T x`` (length ``proj_dim``)
with a random ``P`` scaled so that ``E[<P^T x, P^T y>] = <x, y>``. By the Johnson-Lindenstrauss
lemma (Johnson & Lindenstrauss 1984; proof as in Dasgupta & Gupta 2003) a Gaussian ``P`` keeps
``|<Px, Py> - <x, y>| <= eps`` for unit ``x, y`` with probability at least
``1 - 4 exp(-(eps^2 - eps^3) k / 4)`` (norm bound, polarised); Achlioptas (2003, Thm. 1.1)
shows the same for ``+-1`` entries. The sparse JL transform / CountSketch (Charikar et al.
2002; Kane & Nelson 2014, "Sparser Johnson-Lindenstrauss transforms", block construction)
touches each coordinate ``nnz`` times. LoGra (Choe et al. 2024, "What is your data worth to
GPT?") projects a Linear/Conv2d gradient ``G = sum_t g_t a_t^T`` as
``P_g^T G P_a = sum_t (P_g^T g_t)(P_a^T a_t)^T``, i.e. with ``P = P_g (x) P_a``, without ever
forming ``G``.

Dense matrices are generated in row chunks of ``block_rows`` from a ``torch.Generator``
seeded by a stable hash of ``(seed, member, chunk)``, so a matrix depends only on these settings
(and, for Gaussians, on the generation dtype: float64 for float64 inputs, else float32), never
on how the input is split into blocks or on the batch. ``generate_on="device"`` (the default)
draws the chunks with a generator on the input's device: on a GPU that is the difference
between generating a large matrix in microseconds and copying it over from the CPU for every
batch, but CUDA's random stream differs from the CPU's, so the same seed gives another (equally
valid) matrix there. ``generate_on="cpu"`` gives the identical matrix on every device.
"""

from datatrace.projection.base import IdentityProjector, Projector
from datatrace.projection.dense import GaussianProjector, RademacherProjector
from datatrace.projection.factored import FactoredProjector
from datatrace.projection.registry import ProjectorKind, make_projector
from datatrace.projection.sjlt import SJLTProjector

__all__ = [
    "FactoredProjector",
    "GaussianProjector",
    "IdentityProjector",
    "Projector",
    "ProjectorKind",
    "RademacherProjector",
    "SJLTProjector",
    "make_projector",
]
