import pytest
import torch

from conftest import corrupt_weights
from pipeline.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from pipeline.integrity import IntegrityError, write_digest
from pipeline.models import build_model
from omegaconf import OmegaConf

MODEL_CFG = {"name": "hstu", "max_len": 12, "dim": 16, "num_layers": 2, "num_heads": 2, "attn_dim": None,
             "hidden_dim": None, "dropout": 0.1, "linear_dropout": 0.1, "time_bias": False,
             "num_time_buckets": 16, "l2_norm": True, "temperature": 0.05}


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = build_model(OmegaConf.create(MODEL_CFG), num_items=30).eval()
    path = save_checkpoint(tmp_path / "model.pt", model, MODEL_CFG, num_items=30, extra={"note": "x"})
    return model, path


def test_round_trip_gives_the_same_outputs(saved):
    model, path = saved
    loaded, payload = load_checkpoint(path, expected_model_cfg=MODEL_CFG)
    history = torch.randint(1, 31, (3, 12))
    lengths = torch.tensor([12, 5, 1])
    with torch.no_grad():
        assert torch.equal(model(history, lengths), loaded(history, lengths))
    assert payload["extra"] == {"note": "x"} and payload["num_items"] == 30


def test_mismatched_config_is_refused_naming_the_key(saved):
    _, path = saved
    with pytest.raises(CheckpointError, match=r"dim: checkpoint=16 config=32"):
        load_checkpoint(path, expected_model_cfg={**MODEL_CFG, "dim": 32})


def test_corrupt_and_missing_checkpoints(saved, tmp_path):
    _, path = saved
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    write_digest(truncated)  # its digest matches: the zip reader is what refuses it
    with pytest.raises(CheckpointError, match="truncated.pt"):
        read_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "absent.pt")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    write_digest(other)
    with pytest.raises(CheckpointError, match="not a genrec checkpoint"):
        read_checkpoint(other)


def test_loading_refuses_pickled_code(tmp_path):
    """weights_only=True: a checkpoint that would run code on load is rejected, not executed."""
    evil = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "model_config": MODEL_CFG, "num_items": 3, "state_dict": {},
                "extra": {"f": print}}, evil)
    write_digest(evil)
    with pytest.raises(CheckpointError):
        read_checkpoint(evil)


def test_bytes_overwritten_in_the_middle_are_refused_naming_the_file_and_both_digests(saved):
    """The zip structure survives 4 KB overwritten in the middle and torch.load reads the damaged weights;
    the digest written by save_checkpoint is what refuses them."""
    _, path = saved
    recorded = path.with_name("model.pt.sha256").read_text().split()[0]
    corrupt_weights(path)
    torch.load(path, weights_only=True)  # still readable: without the digest this would load
    with pytest.raises(IntegrityError, match=rf"{path} is corrupt: its sha256 is [0-9a-f]{{64}}, but {recorded} was recorded"):
        load_checkpoint(path)


def test_a_checkpoint_without_its_digest_is_refused(saved):
    _, path = saved
    path.with_name("model.pt.sha256").unlink()
    with pytest.raises(IntegrityError, match="model.pt has no digest"):
        read_checkpoint(path)
