"""Recording checkpoints during a user's training loop (DESIGN.md §2).

TracIn and Source read a *trajectory*: the ordered checkpoints of one training run, each with
its weights, its optimizer step, the learning rate in force, the optimizer kind and, for
multi-stage runs (pretrain -> fine-tune), the training indices of the stage it belongs to.
:class:`CheckpointRecorder` collects them inside a plain loop, in memory or on disk::

    recorder = CheckpointRecorder("run/", every=100)      # or at_steps=[...], or neither
    recorder.set_stage(pretrain_indices)                   # optional: multi-stage runs
    for step, batch in enumerate(loader, start=1):
        ...; opt.step()
        recorder.maybe_record(model, step, optimizer=opt)  # after the update
    recorder.record(model, step, optimizer=opt)            # the final model, always
    task = Task(model, checkpoints=recorder.trajectory)    # or load_trajectory("run/")

The ``unrolled`` method replays the run instead, and needs its *recipe*
(:class:`datatrace.replay.TrainingRecipe`): the initial weights, the indices and learning
rate of every optimizer step, the optimizer's hyperparameters and, where the loop drew random
numbers, the seed of every step. The same recorder captures it::

    recorder.attach(model, opt)                            # before the first step
    for idx in order:                                      # idx: training indices of a step
        opt.zero_grad(); loss_fn(model(x[idx]), y[idx]).backward(); opt.step()
        recorder.record_step(idx)                          # after opt.step()
    recipe = recorder.recipe(model)                        # final weights: the model's now

The learning rate, and the check that the hyperparameters did not change, are read by a hook
on ``opt.step`` (so a scheduler may change the rate between steps); a ``record_step`` must
follow every ``opt.step`` exactly once, which refuses gradient accumulation the recorder
cannot see.

Convention: a checkpoint recorded at step ``s`` holds the weights *after* ``s`` optimizer
steps; its learning rate and training indices describe the steps that led to it (since the
previous checkpoint). On disk every file (``step-<s>.pt`` and ``trajectory.json``) is written
under a temporary name and renamed, so a killed job never leaves a half-written checkpoint;
weights are plain state dicts that load with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datatrace._io import atomic_write
from datatrace.errors import ConfigError, DataError, ModelError
from datatrace.replay import OptimizerSpec, ReplayStep, TrainingRecipe
from datatrace.task import Checkpoint

__all__ = ["CheckpointRecorder", "load_trajectory"]

MANIFEST = "trajectory.json"
FORMAT_VERSION = 1


def _as_indices(indices: Any) -> tuple[int, ...]:
    if isinstance(indices, torch.Tensor):
        if indices.dtype == torch.bool:
            if indices.ndim != 1:
                raise DataError(
                    f"a boolean stage mask must be 1-D; got shape {tuple(indices.shape)}."
                )
            indices = indices.nonzero().squeeze(1)
        if indices.ndim != 1 or indices.is_floating_point() or indices.is_complex():
            raise DataError(
                f"stage indices must be a 1-D integer tensor or a sequence of ints; got shape "
                f"{tuple(indices.shape)} and dtype {indices.dtype}."
            )
        values = [int(i) for i in indices.tolist()]
    elif isinstance(indices, Iterable) and not isinstance(indices, (str, bytes, Mapping)):
        values = []
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int):
                raise DataError(
                    f"stage indices must be ints; got {i!r} ({type(i).__name__}) among them."
                )
            values.append(i)
    else:
        raise DataError(
            f"stage indices must be a 1-D integer tensor or a sequence of ints; got "
            f"{type(indices).__name__}."
        )
    if not values:
        raise DataError("a stage must train on at least one example; got no indices.")
    if min(values) < 0:
        raise DataError(f"stage indices must be >= 0; got {min(values)}.")
    if len(set(values)) != len(values):
        raise DataError(
            "stage indices contain duplicates; pass each training index once (a stage is a set)."
        )
    return tuple(sorted(values))


def _learning_rate(optimizer: torch.optim.Optimizer | None, learning_rate: float | None) -> float:
    if learning_rate is not None:
        if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)):
            raise ConfigError(f"learning_rate must be a number; got {learning_rate!r}.")
        return float(learning_rate)
    if optimizer is None:
        raise ConfigError(
            "record() needs the learning rate in force: pass optimizer=opt (its first param "
            "group's lr is read) or learning_rate=."
        )
    return _one_learning_rate(
        optimizer, "pass learning_rate= explicitly (a checkpoint carries one learning rate)."
    )


def _one_learning_rate(optimizer: torch.optim.Optimizer, fix: str) -> float:
    """The learning rate all of ``optimizer``'s parameter groups share; ``fix`` ends the error."""
    lrs = {float(g["lr"]) for g in optimizer.param_groups}
    if len(lrs) != 1:
        raise ConfigError(
            f"the optimizer's parameter groups use different learning rates {sorted(lrs)}; {fix}"
        )
    return lrs.pop()


def _optimizer_kind(optimizer: torch.optim.Optimizer | None, kind: str | None) -> str:
    if kind is not None:
        if not isinstance(kind, str) or not kind:
            raise ConfigError(f"optimizer_kind must be a non-empty string; got {kind!r}.")
        return kind
    if optimizer is None:
        return "sgd"
    return type(optimizer).__name__.lower()


class CheckpointRecorder:
    """Saves checkpoints of a model at chosen steps of a training loop.

    Args:
        directory: where to write ``step-<s>.pt`` files and ``trajectory.json``; None keeps
            checkpoints in memory (cloned state dicts).
        every: record at every step that is a multiple of ``every`` (with
            :meth:`maybe_record`).
        at_steps: record at exactly these steps (with :meth:`maybe_record`).
        optimizer_kind: optimizer kind stored in each checkpoint (default: the class name of
            the optimizer passed to :meth:`record`, lower-cased, e.g. ``"sgd"``).
        overwrite: allow a ``directory`` that already holds a trajectory (it is replaced).

    Give ``every`` or ``at_steps`` (or neither, and call :meth:`record` yourself). Steps
    must increase from one checkpoint to the next.

    Example:
        >>> model = nn.Linear(3, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> recorder = CheckpointRecorder(every=2)
        >>> recorder.set_stage(range(8))
        >>> for step in range(1, 5):
        ...     opt.step()
        ...     _ = recorder.maybe_record(model, step, optimizer=opt)
        >>> [(c.step, c.learning_rate, len(c.train_indices)) for c in recorder.trajectory]
        [(2, 0.1, 8), (4, 0.1, 8)]
    """

    def __init__(
        self,
        directory: str | Path | None = None,
        *,
        every: int | None = None,
        at_steps: Sequence[int] | None = None,
        optimizer_kind: str | None = None,
        overwrite: bool = False,
    ) -> None:
        if every is not None and at_steps is not None:
            raise ConfigError(
                f"give either every= or at_steps=, not both; got every={every!r} and "
                f"at_steps={list(at_steps)!r}."
            )
        if every is not None and (
            isinstance(every, bool) or not isinstance(every, int) or every < 1
        ):
            raise ConfigError(f"every must be an int >= 1; got {every!r}.")
        self._steps: frozenset[int] | None = None
        if at_steps is not None:
            if isinstance(at_steps, (str, bytes)) or not isinstance(at_steps, Iterable):
                raise ConfigError(f"at_steps must be a sequence of ints; got {at_steps!r}.")
            steps = list(at_steps)
            bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, int) or s < 0]
            if bad or not steps:
                raise ConfigError(
                    f"at_steps must be a non-empty sequence of ints >= 0; got {steps!r}."
                )
            self._steps = frozenset(steps)
        self.every = every
        if optimizer_kind is not None:
            _optimizer_kind(None, optimizer_kind)
        self.optimizer_kind = optimizer_kind
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            if self.directory.exists() and not self.directory.is_dir():
                raise ConfigError(f"{str(self.directory)!r} exists and is not a directory.")
            if (self.directory / MANIFEST).exists() and not overwrite:
                raise ConfigError(
                    f"{str(self.directory)!r} already holds a trajectory ({MANIFEST}); choose "
                    "another directory, load it with load_trajectory(), or pass overwrite=True."
                )
            if (self.directory / MANIFEST).exists():  # overwrite=True: drop the old run's files
                for old in self.directory.glob("step-*.pt"):
                    old.unlink()
                (self.directory / MANIFEST).unlink()
            self.directory.mkdir(parents=True, exist_ok=True)
        self._stage: tuple[int, ...] | None = None
        self._stages: list[tuple[int, ...]] = []
        self._entries: list[dict[str, Any]] = []
        self.trajectory: list[Checkpoint] = []
        self._run: _RunRecord | None = None

    # ------------------------------------------------------------------ replay recipe
    def attach(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        reduction: str = "mean",
        augment: Any = None,
    ) -> None:
        """Start recording the run's recipe: call before the first ``optimizer.step()``.

        Args:
            model: the model about to be trained (its current state is the initial one).
            optimizer: its optimizer (SGD, Adam or AdamW; refused otherwise), with no state yet.
            reduction: how the loop combines a batch's per-example losses: ``"mean"`` or
                ``"sum"``.
            augment: ``augment(batch, generator) -> batch`` when the loop augments each
                batch with a generator seeded by the step's seed (every step then needs one).

        Raises:
            ConfigError: an optimizer or model the replay cannot reproduce (named).
        """
        if not isinstance(model, nn.Module):
            raise ModelError(
                f"attach() needs the nn.Module being trained; got {type(model).__name__}."
            )
        if self._run is not None:
            raise ConfigError("this recorder is already attached to a run; use a new recorder.")
        self._run = _RunRecord(model, optimizer, reduction, augment)

    def record_step(self, indices: Any, *, seed: int | None = None) -> None:
        """Record the optimizer step just taken: the training indices of its batch.

        Args:
            indices: the training examples the step's loss summed over (ints or a 1-D integer
                tensor; repeats allowed).
            seed: the seed the loop gave ``torch.manual_seed`` right before this step's
                forward pass (needed for dropout in train mode and for augmentation).
        """
        if self._run is None:
            raise ConfigError(
                "record_step() before attach(): call recorder.attach(model, optimizer) before "
                "the first optimizer step."
            )
        self._run.record_step(indices, seed)

    def recipe(self, model: nn.Module) -> TrainingRecipe:
        """The recorded recipe, with ``model``'s current weights as the final ones."""
        if self._run is None:
            raise ConfigError("recipe() before attach(): nothing was recorded.")
        return self._run.recipe(model)

    # ------------------------------------------------------------------ stages
    def set_stage(self, train_indices: Any) -> None:
        """Declare the training indices the following steps draw from (a new stage).

        Args:
            train_indices: indices into the training set (ints, a 1-D integer tensor or a
                boolean mask); None returns to "the whole training set".
        """
        self._stage = None if train_indices is None else _as_indices(train_indices)

    # ------------------------------------------------------------------ recording
    def wants(self, step: int) -> bool:
        """Whether :meth:`maybe_record` records at ``step``."""
        if self._steps is not None:
            return step in self._steps
        if self.every is not None:
            return step % self.every == 0
        return False

    def maybe_record(
        self,
        model: nn.Module,
        step: int,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        learning_rate: float | None = None,
    ) -> Checkpoint | None:
        """Record if ``step`` is one of the chosen steps; returns the checkpoint or None."""
        self._check_step(step)
        if not self.wants(step):
            return None
        return self.record(model, step, optimizer=optimizer, learning_rate=learning_rate)

    def record(
        self,
        model: nn.Module,
        step: int,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        learning_rate: float | None = None,
    ) -> Checkpoint:
        """Record ``model``'s weights after ``step`` optimizer steps, unconditionally.

        Args:
            model: the model being trained.
            step: optimizer steps taken so far (greater than the previous checkpoint's).
            optimizer: read the learning rate (and the kind) from it.
            learning_rate: the learning rate of the steps that led here (overrides
                ``optimizer``'s).
        """
        if not isinstance(model, nn.Module):
            raise ModelError(
                f"record() needs the nn.Module being trained; got {type(model).__name__}."
            )
        self._check_step(step)
        if self.trajectory and step <= self.trajectory[-1].step:
            raise ConfigError(
                f"checkpoint steps must increase; got step {step} after step "
                f"{self.trajectory[-1].step}."
            )
        lr = _learning_rate(optimizer, learning_rate)
        if not lr > 0:
            raise ConfigError(f"the learning rate must be > 0; got {lr}.")
        kind = _optimizer_kind(optimizer, self.optimizer_kind)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        stored: Mapping[str, torch.Tensor] | Path = state
        if self.directory is not None:
            path = self.directory / f"step-{step:09d}.pt"
            cpu = {k: v.cpu() for k, v in state.items()}
            atomic_write(path, lambda fh: torch.save(cpu, fh))
            stored = path
        ckpt = Checkpoint(
            stored, step=step, learning_rate=lr, optimizer=kind, train_indices=self._stage
        )
        self.trajectory.append(ckpt)
        if self.directory is not None:
            self._write_manifest(ckpt)
        return ckpt

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _check_step(step: Any) -> None:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(f"step must be an int >= 0 (optimizer steps taken); got {step!r}.")

    def _write_manifest(self, ckpt: Checkpoint) -> None:
        assert self.directory is not None and isinstance(ckpt.state, Path)
        stage = None
        if ckpt.train_indices is not None:
            if not self._stages or self._stages[-1] != ckpt.train_indices:
                self._stages.append(ckpt.train_indices)
            stage = len(self._stages) - 1
        self._entries.append(
            {
                "file": ckpt.state.name,
                "step": ckpt.step,
                "learning_rate": ckpt.learning_rate,
                "optimizer": ckpt.optimizer,
                "stage": stage,
            }
        )
        manifest = {
            "format_version": FORMAT_VERSION,
            "stages": [list(s) for s in self._stages],
            "checkpoints": self._entries,
        }
        text = json.dumps(manifest).encode()
        atomic_write(self.directory / MANIFEST, lambda fh: fh.write(text))


class _RunRecord:
    """What :meth:`CheckpointRecorder.attach` captures and its optimizer hook collects."""

    def __init__(self, model: nn.Module, optimizer: Any, reduction: str, augment: Any) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"attach() needs the torch.optim optimizer; got {type(optimizer).__name__}."
            )
        self.spec = OptimizerSpec.from_optimizer(optimizer)
        if reduction not in ("mean", "sum"):
            raise ConfigError(f"reduction must be 'mean' or 'sum'; got {reduction!r}.")
        if augment is not None and not callable(augment):
            raise ConfigError(f"augment must be a callable; got {type(augment).__name__}.")
        if any(len(s) for s in optimizer.state.values()):
            raise ConfigError(
                "the optimizer already holds state (it has stepped); attach() before its first "
                "step, so that the replay starts where the run did."
            )
        names = {id(p): n for n, p in model.named_parameters()}
        trained = [p for g in optimizer.param_groups for p in g["params"]]
        foreign = [i for i, p in enumerate(trained) if id(p) not in names]
        if foreign:
            raise ModelError(
                f"the optimizer updates {len(foreign)} tensor(s) that are not parameters of the "
                "model; the replay trains the model's parameters only."
            )
        order = list(names.values())
        self.params = tuple(sorted({names[id(p)] for p in trained}, key=order.index))
        self.model_type = type(model).__name__
        self.train_mode = self._check_modules(model)
        self.reduction = reduction
        self.augment = augment
        self.initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.steps: list[ReplayStep] = []
        self.pending: list[float] = []
        self.handle = optimizer.register_step_pre_hook(self._before_step)

    @staticmethod
    def _check_modules(model: nn.Module) -> bool:
        """Whether random modules run in train mode; refuses what replay cannot redo."""
        random = []
        for name, m in model.named_modules():
            if not m.training:
                continue
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                raise ConfigError(
                    f"module {name or type(m).__name__!r} ({type(m).__name__}) is in train mode "
                    "and updates running statistics, which the replay does not reproduce; "
                    "freeze it (eval mode) during training or use LayerNorm/GroupNorm."
                )
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
                random.append(name)
        return bool(random)

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if OptimizerSpec.from_optimizer(optimizer) != self.spec:
            raise ConfigError(
                f"the optimizer's hyperparameters changed during the run (now "
                f"{OptimizerSpec.from_optimizer(optimizer)}, at the start {self.spec}); the replay "
                "supports a changing learning rate only."
            )
        self.pending.append(
            _one_learning_rate(optimizer, "the replay needs one learning rate per step.")
        )

    def record_step(self, indices: Any, seed: int | None) -> None:
        step = len(self.steps) + 1
        if len(self.pending) != 1:
            raise ConfigError(
                f"record_step() for step {step} follows {len(self.pending)} optimizer steps; call "
                "it once after every optimizer.step(). Gradient accumulation (several batches per "
                "step) is not replayable: record one step per optimizer.step() with all of its "
                "indices only if the loss is one mean over them."
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"seed must be an int or None; got {seed!r}.")
        values = _step_indices(indices)
        self.steps.append(ReplayStep(values, self.pending.pop(), seed))

    def recipe(self, model: nn.Module) -> TrainingRecipe:
        if self.pending:
            raise ConfigError(
                f"the optimizer stepped {len(self.pending)} time(s) since the last "
                "record_step(); record every step before asking for the recipe."
            )
        return TrainingRecipe(
            initial_state=self.initial,
            optimizer=self.spec,
            steps=tuple(self.steps),
            params=self.params,
            final_state={k: v.detach().clone() for k, v in model.state_dict().items()},
            reduction=self.reduction,  # type: ignore[arg-type]
            train_mode=self.train_mode,
            augment=self.augment,
        )


def _step_indices(indices: Any) -> tuple[int, ...]:
    if isinstance(indices, torch.Tensor):
        if indices.ndim != 1 or indices.is_floating_point() or indices.dtype == torch.bool:
            raise DataError(
                f"a step's indices must be a 1-D integer tensor or a sequence of ints; got shape "
                f"{tuple(indices.shape)} and dtype {indices.dtype}."
            )
        values = tuple(int(i) for i in indices.tolist())
    else:
        values = tuple(indices)
        if any(isinstance(i, bool) or not isinstance(i, int) for i in values):
            raise DataError(f"a step's indices must be ints; got {list(values)[:5]!r}.")
    if not values or min(values) < 0:
        raise DataError(
            f"a step trains on >= 1 example with indices >= 0; got {list(values)[:5]!r}."
        )
    return values


def load_trajectory(directory: str | Path) -> list[Checkpoint]:
    """The checkpoints a :class:`CheckpointRecorder` wrote to ``directory``, in step order.

    Weights stay on disk until used; :meth:`Checkpoint.load` reads them with
    ``weights_only=True``.

    Raises:
        ModelError: if the directory, its ``trajectory.json`` or a listed file is missing or
            malformed.

    Example:
        >>> import tempfile
        >>> run = Path(tempfile.mkdtemp()) / "run"
        >>> _ = CheckpointRecorder(run).record(nn.Linear(2, 2), 5, learning_rate=0.1)
        >>> [(c.step, c.learning_rate) for c in load_trajectory(run)]
        [(5, 0.1)]
    """
    root = Path(directory)
    path = root / MANIFEST
    if not path.exists():
        raise ModelError(
            f"{str(root)!r} holds no {MANIFEST}; record a trajectory there with "
            "CheckpointRecorder(directory) first."
        )
    try:
        manifest = json.loads(path.read_text())
        version = manifest["format_version"]
        stages = [tuple(int(i) for i in s) for s in manifest["stages"]]
        entries = list(manifest["checkpoints"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{str(path)!r} is not a trajectory manifest ({exc!r}).") from exc
    if version != FORMAT_VERSION:
        raise ModelError(
            f"{str(path)!r} has format_version {version!r}; this datatrace reads version "
            f"{FORMAT_VERSION}."
        )
    out = []
    for e in entries:
        try:
            file = root / str(e["file"])
            stage = e["stage"]
            indices = None if stage is None else stages[int(stage)]
            ckpt = Checkpoint(
                file,
                step=int(e["step"]),
                learning_rate=float(e["learning_rate"]),
                optimizer=str(e["optimizer"]),
                train_indices=indices,
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ModelError(f"{str(path)!r} has a malformed checkpoint entry {e!r}.") from exc
        if not file.exists():
            raise ModelError(
                f"{str(path)!r} lists {file.name!r}, which is missing from {str(root)!r}."
            )
        out.append(ckpt)
    return out
