import bitsandbytes as bnb
import pytest
import torch

from dreamlora import checkpoints


def stepped(optimizer_class):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 80)), torch.nn.Parameter(torch.randn(8))]  # 5120 elements: 8-bit state
    optimizer = optimizer_class(params, lr=1e-3)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    scheduler.step()
    return params, optimizer, scheduler


@pytest.mark.parametrize("optimizer_class", [torch.optim.AdamW, bnb.optim.AdamW8bit], ids=["adamw", "adamw8bit"])
def test_optimizer_and_scheduler_round_trip_exactly(tmp_path, optimizer_class):
    params, optimizer, scheduler = stepped(optimizer_class)
    adapter = {"unet.w": torch.arange(6.0)}
    checkpoints.save_checkpoint(tmp_path, 7, adapter, optimizer, scheduler, '{"a": 1}', keep=2)
    fresh_params, fresh, fresh_scheduler = stepped(optimizer_class)
    fresh.state.clear()
    loaded_adapter, state = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(tmp_path), fresh, fresh_scheduler)
    config = state["config"]
    assert config == {"a": 1} and torch.equal(loaded_adapter["unet.w"], adapter["unet.w"])
    original, restored = optimizer.state_dict()["state"], fresh.state_dict()["state"]
    for pid in original:
        for name, value in original[pid].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, restored[pid][name]), name
            elif isinstance(value, dict):
                for sub, item in value.items():
                    assert torch.equal(item, restored[pid][name][sub]) if isinstance(item, torch.Tensor) \
                        else item == restored[pid][name][sub]
            else:
                assert value == restored[pid][name]
    assert fresh_scheduler.state_dict()["last_epoch"] == scheduler.state_dict()["last_epoch"]


def test_only_the_newest_checkpoints_are_kept_and_none_is_partial(tmp_path):
    _, optimizer, scheduler = stepped(torch.optim.AdamW)
    for step in (2, 4, 6):
        checkpoints.save_checkpoint(tmp_path, step, {"w": torch.zeros(1)}, optimizer, scheduler, "{}", keep=2)
    assert [c.step for c in checkpoints.list_checkpoints(tmp_path)] == [4, 6]
    leftovers = [p for p in checkpoints.checkpoint_dir(tmp_path).iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_the_fp16_loss_scaler_and_the_run_record_are_checkpointed(tmp_path):
    """An fp16 run's loss scale (grown or backed off over the run) continues on resume, not from 65536."""
    _, optimizer, scheduler = stepped(torch.optim.AdamW)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    scaler.load_state_dict({**scaler.state_dict(), "scale": 96.0, "_growth_tracker": 2})  # as if backed off by overflows
    run = {"model": "abc", "processes": 2}
    checkpoints.save_checkpoint(tmp_path, 3, {"w": torch.zeros(1)}, optimizer, scheduler, "{}", keep=2, run=run,
                                scaler=scaler)
    fresh = torch.amp.GradScaler("cpu", init_scale=65536.0, growth_interval=3)
    _, state = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(tmp_path), optimizer, scheduler, scaler=fresh)
    assert fresh.get_scale() == 96.0 and fresh.state_dict()["_growth_tracker"] == 2
    assert state["run"] == run
