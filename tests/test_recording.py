"""Checkpoint recording inside a plain training loop (datatrace.recording)."""

import json

import pytest
import torch
from torch import nn

from datatrace import Checkpoint, ConfigError, DataError, ModelError, Task
from datatrace.recording import CheckpointRecorder, load_trajectory


def _train(recorder: CheckpointRecorder, steps: int = 6, stages=None, lr_drop_at: int = 4):
    """A plain SGD loop; returns the model and the weights after every step."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    x = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randn(10, 2, dtype=torch.float64)
    after = {}
    for step in range(1, steps + 1):
        if stages is not None and step in stages:
            recorder.set_stage(stages[step])
        if step == lr_drop_at:
            for g in opt.param_groups:
                g["lr"] = 0.1
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        after[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        recorder.maybe_record(model, step, optimizer=opt)
    return model, after


@pytest.mark.parametrize("on_disk", [False, True])
def test_records_chosen_steps_with_weights_lr_kind_and_stages(tmp_path, on_disk):
    recorder = CheckpointRecorder(tmp_path / "run" if on_disk else None, at_steps=[2, 3, 6])
    stages = {1: range(0, 5), 3: torch.tensor([7, 5, 9])}
    _, after = _train(recorder, stages=stages)
    traj = recorder.trajectory
    assert [c.step for c in traj] == [2, 3, 6]
    assert [c.learning_rate for c in traj] == [0.5, 0.5, 0.1]
    assert all(c.optimizer == "sgd" for c in traj)
    assert [c.train_indices for c in traj] == [(0, 1, 2, 3, 4), (5, 7, 9), (5, 7, 9)]
    for c in traj:
        loaded = c.load()
        assert set(loaded) == {"weight", "bias"}
        for k, v in loaded.items():
            assert torch.equal(v, after[c.step][k])
    if on_disk:
        assert all(isinstance(c.state, type(tmp_path)) for c in traj)
        # plain state dicts of tensors: the safe loader accepts them
        for c in traj:
            state = torch.load(c.state, weights_only=True)
            assert torch.equal(state["weight"], after[c.step]["weight"])
        back = load_trajectory(tmp_path / "run")
        assert [(c.step, c.learning_rate, c.optimizer, c.train_indices) for c in back] == [
            (c.step, c.learning_rate, c.optimizer, c.train_indices) for c in traj
        ]
        assert torch.equal(back[1].load()["bias"], after[3]["bias"])
        # no temporary file is left behind
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
            "step-000000002.pt",
            "step-000000003.pt",
            "step-000000006.pt",
            "trajectory.json",
        ]


def test_every_and_a_task_built_from_the_trajectory(tmp_path):
    recorder = CheckpointRecorder(tmp_path / "run", every=2)
    model, after = _train(recorder, steps=5)
    assert [c.step for c in recorder.trajectory] == [2, 4]
    recorder.record(model, 5, learning_rate=0.1)  # the final model
    task = Task(model.eval(), loss="mse", checkpoints=load_trajectory(tmp_path / "run"))
    assert [c.step for c in task.checkpoints] == [2, 4, 5]
    assert torch.equal(task.state(task.checkpoints[0])["weight"], after[2]["weight"])


def test_explicit_learning_rate_and_kind_override_the_optimizer():
    recorder = CheckpointRecorder(optimizer_kind="sgd-momentum")
    model = nn.Linear(2, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    a = recorder.record(model, 1, optimizer=opt)
    b = recorder.record(model, 2, optimizer=opt, learning_rate=0.25)
    assert (a.optimizer, a.learning_rate) == ("sgd-momentum", 1e-3)
    assert (b.optimizer, b.learning_rate) == ("sgd-momentum", 0.25)
    assert CheckpointRecorder().record(model, 1, optimizer=opt).optimizer == "adam"


def test_in_memory_checkpoints_are_copies():
    model = nn.Linear(2, 1)
    ckpt = CheckpointRecorder().record(model, 1, learning_rate=0.1)
    before = ckpt.load()["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    assert torch.equal(ckpt.load()["weight"], before)


def test_bad_input_is_refused(tmp_path):
    model = nn.Linear(2, 1)
    with pytest.raises(ConfigError, match="either every= or at_steps="):
        CheckpointRecorder(every=2, at_steps=[1])
    with pytest.raises(ConfigError, match="every must be an int >= 1; got 0"):
        CheckpointRecorder(every=0)
    with pytest.raises(ConfigError, match="at_steps"):
        CheckpointRecorder(at_steps=[3, -1])
    recorder = CheckpointRecorder()
    with pytest.raises(ConfigError, match="needs the learning rate"):
        recorder.record(model, 1)
    with pytest.raises(ConfigError, match=r"must be > 0; got -0\.1"):
        recorder.record(model, 1, learning_rate=-0.1)
    with pytest.raises(ConfigError, match="step must be an int >= 0"):
        recorder.record(model, 1.5, learning_rate=0.1)
    recorder.record(model, 3, learning_rate=0.1)
    with pytest.raises(ConfigError, match="steps must increase; got step 3 after step 3"):
        recorder.record(model, 3, learning_rate=0.1)
    with pytest.raises(ModelError, match=r"nn\.Module"):
        recorder.record({"w": torch.zeros(1)}, 4, learning_rate=0.1)
    two_groups = torch.optim.SGD(
        [{"params": [model.weight], "lr": 0.1}, {"params": [model.bias], "lr": 0.2}]
    )
    with pytest.raises(ConfigError, match=r"different learning rates \[0.1, 0.2\]"):
        recorder.record(model, 5, optimizer=two_groups)
    with pytest.raises(DataError, match="duplicates"):
        recorder.set_stage([1, 1, 2])
    with pytest.raises(DataError, match="at least one"):
        recorder.set_stage([])
    with pytest.raises(DataError, match=">= 0; got -2"):
        recorder.set_stage([-2, 1])
    with pytest.raises(DataError, match="ints"):
        recorder.set_stage([0.5, 1])
    CheckpointRecorder(tmp_path / "run").record(model, 1, learning_rate=0.1)
    with pytest.raises(ConfigError, match="already holds a trajectory"):
        CheckpointRecorder(tmp_path / "run")
    replaced = CheckpointRecorder(tmp_path / "run", overwrite=True)
    replaced.record(model, 7, learning_rate=0.1)
    assert [c.step for c in load_trajectory(tmp_path / "run")] == [7]


def test_loading_refuses_missing_or_malformed_trajectories(tmp_path):
    with pytest.raises(ModelError, match=r"holds no trajectory\.json"):
        load_trajectory(tmp_path)
    run = tmp_path / "run"
    recorder = CheckpointRecorder(run)
    recorder.record(nn.Linear(2, 1), 1, learning_rate=0.1)
    recorder.record(nn.Linear(2, 1), 2, learning_rate=0.1)
    (run / "step-000000001.pt").unlink()
    with pytest.raises(ModelError, match=r"step-000000001\.pt.*missing"):
        load_trajectory(run)
    manifest = json.loads((run / "trajectory.json").read_text())
    manifest["format_version"] = 99
    (run / "trajectory.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="format_version 99"):
        load_trajectory(run)
    (run / "trajectory.json").write_text("{not json")
    with pytest.raises(ModelError, match="not a trajectory manifest"):
        load_trajectory(run)
    # a pickled object that is not a plain state dict is refused by the safe loader
    bad = tmp_path / "bad.pt"
    torch.save({"weight": torch.zeros(1), "fn": _train}, bad)
    with pytest.raises(ModelError, match="weights_only=True"):
        Checkpoint(bad).load()
