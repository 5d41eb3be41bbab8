"""train.py's data path: token windows over a split, and the special-token ids instruction data is encoded with."""
import json

import numpy as np
import pytest

import train


def write_split(d, split, tokens):
    np.array(tokens, dtype=np.uint16).tofile(d / f"{split}.bin")


def test_every_window_start_is_drawn():
    """A split of block_size + 3 tokens has starts 0, 1 and 2; the last token is in the window at start 2."""
    data = np.arange(11, dtype=np.uint16)  # block_size 8
    starts = set()
    for seed in range(50):
        x, y = train.get_batch(data, 4, 8, seed)
        assert (y[:, :-1] == x[:, 1:]).all()
        starts |= set(x[:, 0].tolist())
    assert starts == {0, 1, 2}
    x, y = train.get_batch(data[:9], 2, 8, 0)  # the smallest split that holds one window
    assert x[0].tolist() == list(range(8)) and y[0].tolist() == list(range(1, 9))


@pytest.mark.parametrize("val_tokens", [0, 5, 8])
def test_split_shorter_than_a_window_is_one_line(tmp_path, val_tokens):
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 64, "dtype": "uint16"}))
    write_split(tmp_path, "train", [i % 64 for i in range(100)])
    write_split(tmp_path, "val", range(val_tokens))
    cfg = train.TrainConfig(data_dir=str(tmp_path), block_size=8, micro_batch=2)
    with pytest.raises(ValueError) as e:
        train.load_data(cfg)
    msg = str(e.value)
    assert "val split" in msg and f"holds {val_tokens} tokens" in msg and "needs 9" in msg and "\n" not in msg
    write_split(tmp_path, "val", range(9))
    _, val_batch, *_ = train.load_data(cfg)
    assert val_batch(0)[1][0, -1] == 8
