"""Fuzz cases for the public API (issue 18, deliverable 5) and their verdicts.

A case is one call an adversarial user could make: a method id, a tiny model, training data
and queries (random sizes, forms, dtypes, NaN/inf, labels out of range, ...), an operation
(``attribute``, ``topk``, ``self_attribute``) and what it must do: ``"ok"`` (finite scores of
the right shape), ``"error"`` (a :class:`~datatrace.errors.DatatraceError` whose message
names one of ``names``) or ``"either"``. :func:`run_case` runs it and returns a verdict:

- ``ok``: finite results of the right shape;
- ``clean``: a ``DatatraceError`` naming the bad value;
- ``vague``: a ``DatatraceError`` whose message does not name it;
- ``refused``: a ``DatatraceError`` for a call that should have worked;
- ``crash``: any other exception (an internal error escaped);
- ``shape``: a result of the wrong shape;
- ``nan``: NaN/inf scores returned without an error;
- ``silent``: nonsense accepted (a result where an error was due).

Only ``ok`` and ``clean`` pass. ``tests/fuzz/test_api_fuzz.py`` draws the cases with
hypothesis; the tally (``TALLY``) counts verdicts per method for docs/reliability.md.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from datatrace import METHODS, Checkpoint, Scores, Task, TopK, make_attributor
from datatrace.errors import DatatraceError
from datatrace.recording import CheckpointRecorder

D_IN, HIDDEN, N_CLASSES = 4, 6, 3
METHOD_IDS = sorted(METHODS)
PASSING = ("ok", "clean")
VERDICTS = ("ok", "clean", "vague", "refused", "crash", "shape", "nan", "silent")

# settings that keep every call at a few milliseconds on the tiny model
OPTIONS: dict[str, dict[str, Any]] = {
    "trak": {"proj_dim": 8},
    "if-lissa": {"damping": 0.5, "solver_options": {"depth": 20}},
    "if-arnoldi": {"solver_options": {"rank": 4}},
    "logra": {"proj_dim_in": 2, "proj_dim_out": 2},
}
# whether a method attributes to groups (source and unrolled refuse groups=)
GROUPS = {m: cls.supports_groups for m, (cls, _) in METHODS.items()}


class Net(nn.Module):
    """A 4-6-3 tanh MLP taking ``x`` by keyword, so dict batches ``{"x", "labels"}`` work."""

    def __init__(self, d_in: int = D_IN, hidden: int = HIDDEN, n_out: int = N_CLASSES) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def net(seed: int = 0, **kw: Any) -> Net:
    torch.manual_seed(seed)
    return Net(**kw).eval()


def make_data(n: int, seed: int, d_in: int = D_IN) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g), torch.randint(0, N_CLASSES, (n,), generator=g)


@dataclass
class Recorded:
    """A tiny recorded SGD run: what ``unrolled`` replays (it needs this very training set)."""

    model: Net
    recipe: Any
    train: tuple[torch.Tensor, torch.Tensor]


def recorded_run() -> Recorded:
    train = make_data(8, seed=11)
    model = net().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = CheckpointRecorder()
    recorder.attach(model, opt)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        idx = torch.randperm(8, generator=g)[:4]
        opt.zero_grad()
        F.cross_entropy(model(train[0][idx]), train[1][idx]).backward()
        opt.step()
        recorder.record_step(idx)
    model.eval()
    return Recorded(model, recorder.recipe(model), train)


def checkpoints(model: nn.Module) -> list[Checkpoint]:
    """Three checkpoints of a pretend run ending at ``model`` (tracin and source read them)."""
    g = torch.Generator().manual_seed(5)
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = []
    for i, step in enumerate((0, 5, 10)):
        scale = 0.1 * (2 - i)
        state = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in final.items()}
        out.append(Checkpoint(state, step=step, learning_rate=0.1))
    return out


@dataclass
class Case:
    """One fuzz call (see the module docstring)."""

    method: str
    kind: str
    expect: str  # "ok", "error" or "either"
    names: tuple[str, ...] = ()  # one of these must appear in the error message
    model: nn.Module | None = None
    loss: str = "cross_entropy"
    train: Any = None
    queries: Any = None
    n_train: int = 0
    n_query: int = 0
    n_units: int | None = None  # groups: the number of distinct ids
    op: str = "attribute"
    k: Any = 1
    kwargs: dict[str, Any] = field(default_factory=dict)
    method_id: str | None = None  # the id passed to make_attributor (an unknown one)
    detail: str = ""

    def __repr__(self) -> str:  # hypothesis prints it for a failing example
        return f"Case({self.method}, {self.kind}, {self.detail}, op={self.op}, k={self.k!r})"


def build(case: Case, recorded: Recorded | None) -> Any:
    """The attributor of ``case`` (not fitted)."""
    model = case.model
    assert model is not None
    kwargs = {**OPTIONS.get(case.method, {}), **case.kwargs}
    checkpoints_ = checkpoints(model) if case.method in ("tracin", "source") else None
    task = Task(model, loss=case.loss, checkpoints=checkpoints_)
    if case.method == "unrolled":
        assert recorded is not None
        kwargs.setdefault("recipe", recorded.recipe)
    method_id = case.method if case.method_id is None else case.method_id
    return make_attributor(method_id, task, **kwargs)


def call(case: Case, recorded: Recorded | None) -> tuple[Any, tuple[int, ...]]:
    """Run the case: ``(result, expected shape)``."""
    attr = build(case, recorded).fit(case.train)
    units = case.n_units if case.n_units is not None else case.n_train
    if case.op == "topk":
        top = attr.topk(case.queries, case.k)
        return top, (case.n_query, min(int(case.k), units))
    if case.op == "self_attribute":
        return attr.self_attribute(), (units,)
    return attr.attribute(case.queries), (case.n_query, units)


def check_result(result: Any, shape: tuple[int, ...]) -> str:
    if isinstance(result, Scores):
        tensors = [result.values]
    elif isinstance(result, TopK):
        tensors = [result.proponent_values, result.opponent_values]
        tensors += [result.proponent_ids, result.opponent_ids]
    else:
        tensors = [result]
    if any(not isinstance(t, torch.Tensor) or tuple(t.shape) != shape for t in tensors):
        return "shape"
    if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors):
        return "nan"
    return "ok"


def run_case(case: Case, recorded: Recorded | None) -> tuple[str, str]:
    """``(verdict, detail)`` of one case (see the module docstring)."""
    try:
        result, shape = call(case, recorded)
    except DatatraceError as exc:
        message = str(exc)
        if case.expect == "ok":
            return "refused", f"{type(exc).__name__}: {message}"
        if case.names and not any(n.lower() in message.lower() for n in case.names):
            return "vague", f"{type(exc).__name__} without {case.names}: {message}"
        return "clean", type(exc).__name__
    except Exception as exc:
        return "crash", f"{type(exc).__name__}: {exc}"
    verdict = check_result(result, shape)
    if verdict == "ok" and case.expect == "error":
        return "silent", f"accepted; expected an error naming {case.names}"
    return verdict, ""


class Tally:
    """Verdicts per method (and per case kind), with a few examples of each failure."""

    def __init__(self) -> None:
        self.counts: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.kinds: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.examples: dict[str, list[str]] = collections.defaultdict(list)

    def add(self, case: Case, verdict: str, detail: str) -> None:
        self.counts[case.method][verdict] += 1
        self.kinds[case.kind][verdict] += 1
        if verdict not in PASSING and len(self.examples[verdict]) < 400:
            self.examples[verdict].append(f"{case!r}: {detail}"[:400])

    def to_json(self) -> dict[str, Any]:
        return {
            "methods": {m: dict(c) for m, c in sorted(self.counts.items())},
            "kinds": {k: dict(c) for k, c in sorted(self.kinds.items())},
            "examples": dict(self.examples),
        }


TALLY = Tally()


# ----------------------------------------------------------------------------- strategies
def _with_form(draw: Any, data: tuple[torch.Tensor, torch.Tensor], batch_size: int) -> Any:
    """The same examples as a tuple, a dict batch, a TensorDataset or a DataLoader."""
    form = draw(st.sampled_from(["tuple", "dict", "dataset", "loader"]))
    x, y = data
    if form == "dict":
        return {"x": x, "labels": y}
    if form == "dataset":
        return TensorDataset(x, y)
    if form == "loader":
        return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)
    return (x, y)


def _poison(t: torch.Tensor, draw: Any) -> tuple[torch.Tensor, str]:
    value = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    out = t.clone()
    flat = out.view(-1)
    flat[draw(st.integers(0, flat.numel() - 1))] = value
    return out, str(value)


KINDS = (
    "valid",
    "empty",
    "input-dtype",
    "nonfinite-input",
    "nonfinite-weights",
    "label-range",
    "feature-size",
    "dict-missing-key",
    "groups",
    "members",
    "topk-k",
    "unknown-id",
    "unknown-kwarg",
    "bad-setting",
    "mse-labels",
    "drop-last",
)


@st.composite
def cases(draw: Any, method: str, kind: str, recorded: Recorded) -> Case:
    """One case of ``kind`` for ``method``; ``unrolled`` keeps the recorded training set (its
    replay must reproduce the recorded weights), every other method gets a random one."""
    replay = method == "unrolled"
    n_train = 8 if replay else draw(st.integers(1, 10))
    n_query = draw(st.integers(1, 4))
    batch_size = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 3))
    train = recorded.train if replay else make_data(n_train, seed)
    queries = make_data(n_query, seed + 100)
    model = recorded.model if replay else net(seed)
    op = draw(st.sampled_from(["attribute", "attribute", "topk", "self_attribute"]))
    k = draw(st.integers(1, n_train)) if op == "topk" else 1
    case = Case(
        method,
        kind,
        "ok",
        model=model,
        n_train=n_train,
        n_query=n_query,
        op=op,
        k=k,
        kwargs={"batch_size": batch_size},
    )
    on_train = draw(st.booleans())
    if op == "self_attribute":
        on_train = True  # queries play no part

    def put(t: Any, x: Any = None, y: Any = None) -> None:
        """Replace the train (or query) inputs/labels by ``x``/``y``."""
        base = case.train if on_train else case.queries
        new = (base[0] if x is None else x, base[1] if y is None else y)
        if on_train:
            case.train = new
        else:
            case.queries = new

    case.train, case.queries = train, queries
    if kind == "valid":
        case.train = _with_form(draw, train, batch_size)
        case.queries = _with_form(draw, queries, batch_size)
        case.detail = f"n={n_train} q={n_query} bs={batch_size}"
    elif kind == "empty":
        case.expect, case.names = "error", ("empty",)
        x, y = (case.train if on_train else case.queries)[0][:0], train[1][:0]
        put(None, x, y)
        case.detail = f"empty {'train' if on_train else 'queries'}"
    elif kind == "input-dtype":
        dtype = draw(st.sampled_from([torch.float16, torch.float64, torch.int64, torch.int32]))
        base = case.train if on_train else case.queries
        put(None, base[0].to(dtype))
        case.expect, case.names = "error", (str(dtype).removeprefix("torch."),)
        case.detail = f"{'train' if on_train else 'query'} inputs {dtype}"
    elif kind == "nonfinite-input":
        base = case.train if on_train else case.queries
        x, value = _poison(base[0], draw)
        put(None, x)
        case.expect, case.names = "error", ("nan", "inf")
        case.detail = f"{value} in {'train' if on_train else 'query'} inputs"
    elif kind == "nonfinite-weights":
        model = net(seed) if not replay else _copy(recorded.model)
        name, p = draw(st.sampled_from(list(model.named_parameters())))
        with torch.no_grad():
            poisoned, value = _poison(p.detach(), draw)
            p.copy_(poisoned)
        case.model = model
        case.expect, case.names = "error", ("nan", "inf", name)
        case.detail = f"{value} in weight {name}"
    elif kind == "label-range":
        bad = draw(st.sampled_from([N_CLASSES, N_CLASSES + 7, -1, -5]))
        base = case.train if on_train else case.queries
        y = base[1].clone()
        y[draw(st.integers(0, len(y) - 1))] = bad
        put(None, None, y)
        case.expect, case.names = "error", (str(bad),)
        case.detail = f"label {bad} in {'train' if on_train else 'queries'}"
    elif kind == "feature-size":
        d = draw(st.sampled_from([1, D_IN - 1, D_IN + 1, D_IN + 5]))
        base = case.train if on_train else case.queries
        n = len(base[1])
        put(None, make_data(n, seed, d_in=d)[0])
        case.expect, case.names = "error", (str(d),)
        case.detail = f"{'train' if on_train else 'query'} features {d} != {D_IN}"
    elif kind == "dict-missing-key":
        missing = draw(st.sampled_from(["x", "labels"]))
        base = case.train if on_train else case.queries
        batch = {"x": base[0], "labels": base[1]}
        if missing == "x":
            batch = {"inputs": base[0], "labels": base[1]}
        else:
            del batch["labels"]
        if on_train:
            case.train = batch
        else:
            case.queries = batch
        case.expect, case.names = "error", ("'inputs'" if missing == "x" else "'labels'",)
        case.detail = f"dict {'train' if on_train else 'queries'} without {missing!r}"
    elif kind == "groups":
        _groups_case(draw, case, n_train)
    elif kind == "members":
        hidden = draw(st.sampled_from([HIDDEN + 1, HIDDEN - 2]))
        other = net(seed + 1, hidden=hidden)
        case.kwargs["members"] = [model, other]
        case.expect, case.names = "error", ("shape", "architecture", "fc1")
        case.detail = f"a member with hidden={hidden}"
    elif kind == "topk-k":
        case.op = "topk"
        case.k = draw(st.sampled_from([0, -1, n_train + 1, n_train + 50, 2.5, True, "3"]))
        if isinstance(case.k, int) and not isinstance(case.k, bool) and case.k > n_train:
            case.expect = "ok"  # k > n: all units, ranked
        else:
            case.expect, case.names = "error", (repr(case.k),)
        case.detail = f"topk(k={case.k!r}) of {n_train} units"
    elif kind == "unknown-id":
        bad = draw(st.sampled_from(["trek", "IF-EKFAC", "", "grad_dot"]))
        case.method_id, case.expect, case.names = bad, "error", (repr(bad),)
        case.detail = f"method id {bad!r}"
    elif kind == "unknown-kwarg":
        bad = draw(st.sampled_from(["dampnig", "proj_dims", "lr", "regularization"]))
        case.kwargs[bad] = 1
        case.expect, case.names = "error", (bad,)
        case.detail = f"keyword {bad}="
    elif kind == "bad-setting":
        name, value = draw(
            st.sampled_from(
                [
                    ("batch_size", 0),
                    ("batch_size", -3),
                    ("batch_size", 2.5),
                    ("proj_dim", 0),
                    ("seed", "x"),
                    ("feature_dtype", "float8"),
                    ("engine", "magic"),
                ]
            )
        )
        case.kwargs[name] = value
        case.expect, case.names = "error", (repr(value), str(value))
        case.detail = f"{name}={value!r}"
    elif kind == "mse-labels":
        case.loss = "mse"
        case.expect, case.names = "error", ("shape", "per example", "mse")
        case.detail = "loss='mse' with (B,) class labels against (B, 3) outputs"
    elif kind == "drop-last":
        if n_train % batch_size == 0 or n_train < batch_size:
            batch_size = n_train + 1 if n_train < 2 else max(2, n_train // 2 + 1)
        x, y = train
        loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, drop_last=True)
        if n_train % batch_size == 0:
            case.expect = "ok"  # nothing dropped
        else:
            case.expect, case.names = "error", ("drop_last",)
        case.train = loader
        case.detail = f"DataLoader(batch_size={batch_size}, drop_last=True) over {n_train}"
    return case


def _copy(model: nn.Module) -> nn.Module:
    other = Net()
    other.load_state_dict(model.state_dict())
    return other.eval()


def _groups_case(draw: Any, case: Case, n_train: int) -> None:
    supported = GROUPS[case.method]
    variant = draw(st.sampled_from(["gaps", "negative", "short", "long", "float"]))
    ids: Any
    if variant == "gaps":
        ids = [3 * draw(st.integers(0, 3)) for _ in range(n_train)]
        case.n_units = len(set(ids))
        case.expect = "ok" if supported else "error"
        case.names = ("groups",)
    elif variant == "negative":
        ids = [draw(st.integers(0, 2)) for _ in range(n_train)]
        ids[draw(st.integers(0, n_train - 1))] = -2
        case.expect, case.names = "error", ("-2", "negative", "groups")
    elif variant in ("short", "long"):
        m = n_train - 1 if variant == "short" else n_train + 2
        ids = [0] * m
        case.expect, case.names = "error", (str(m), "groups")
        if m == 0:
            case.names = ("empty", "0", "groups")
    else:
        ids = [0.5] * n_train
        case.expect, case.names = "error", ("0.5", "float", "integer", "groups")
    if case.op == "topk":
        case.k = 1
    case.kwargs["groups"] = ids
    case.detail = f"groups={ids} ({variant})"


def summary(tally: dict[str, Any]) -> str:
    """A markdown table of a tally written by the fuzz test (``DATATRACE_FUZZ_TALLY``)."""
    head = "| method | calls | " + " | ".join(VERDICTS) + " |"
    lines = [head, "|" + "---|" * (len(VERDICTS) + 2)]
    total: collections.Counter[str] = collections.Counter()
    for method, counts in tally["methods"].items():
        total.update(counts)
        row = [str(counts.get(v, 0)) for v in VERDICTS]
        lines.append(f"| `{method}` | {sum(counts.values())} | " + " | ".join(row) + " |")
    row = [str(total.get(v, 0)) for v in VERDICTS]
    lines.append(f"| **all** | {sum(total.values())} | " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import json
    import sys
    from pathlib import Path

    data = json.loads(Path(sys.argv[1]).read_text())
    print(summary(data))
    for kind, counts in data["kinds"].items():
        print(f"{kind:18s}", dict(counts))
    for verdict, examples in data["examples"].items():
        print(f"== {verdict}: {len(examples)}")
        seen: set[str] = set()
        for e in examples:
            key = e.split(",", 2)[1] + e.split(": ", 1)[-1][:60]
            if key not in seen:
                seen.add(key)
                print("  ", e[:300])
