"""The HeadKV scores file: round trip, model-shape check and every way a file can be wrong."""
import json

import pytest
import torch

from vllm_kvcompress.policies.head_scores import FORMAT, HeadScores

RETRIEVAL = [[0.5, 0.0, 1.0], [2.0, 0.25, 0.0]]
REASONING = [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]


def valid_document() -> dict:
    return {
        "format": FORMAT,
        "version": 1,
        "model": "tiny",
        "num_layers": 2,
        "num_kv_heads": 3,
        "retrieval": RETRIEVAL,
        "retrieval_reasoning": REASONING,
        "calibration": {"prompts": 4, "seed": 0},
    }


def write(tmp_path, document) -> str:
    path = tmp_path / "scores.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return str(path)


def test_round_trip(tmp_path):
    scores = HeadScores("tiny", RETRIEVAL, REASONING, {"seed": 3})
    path = tmp_path / "s.json"
    scores.save(path)
    loaded = HeadScores.load(path)
    assert loaded == scores
    assert loaded.shape == (2, 3)
    assert json.loads(path.read_text())["format"] == FORMAT


@pytest.mark.parametrize("kind, rows", [("retrieval", RETRIEVAL), ("retrieval_reasoning", REASONING)])
def test_tensor(kind, rows):
    tensor = HeadScores("tiny", RETRIEVAL, REASONING).tensor(kind)
    assert tensor.dtype == torch.float64 and tensor.tolist() == rows


def test_tensor_unknown_kind():
    with pytest.raises(ValueError, match="retrieval, retrieval_reasoning"):
        HeadScores("tiny", RETRIEVAL, REASONING).tensor("reasoning")


def test_check_model():
    scores = HeadScores("tiny", RETRIEVAL, REASONING)
    scores.check_model(2, 3)
    with pytest.raises(ValueError, match=r"'tiny' with 2 layers x 3 KV heads.* 30 x 3.*calibrate"):
        scores.check_model(30, 3, source="s.json")


@pytest.mark.parametrize(
    "change, words",
    [
        ({"format": "something-else"}, "not a head-scores file"),
        ({"format": None}, "not a head-scores file"),
        ({"retrieval": None}, "retrieval"),
        ({"retrieval": 5}, "retrieval"),
        ({"retrieval": "high"}, "retrieval"),
        ({"retrieval": []}, "non-empty"),
        ({"retrieval": [[]]}, "non-empty"),
        ({"retrieval": [[1.0, 2.0, 3.0], [1.0, 2.0]]}, "non-empty"),  # ragged
        ({"retrieval": [1.0, 2.0]}, "non-empty"),
        ({"retrieval": [[1.0, -2.0, 3.0], [1.0, 2.0, 3.0]]}, ">= 0"),
        ({"retrieval": [[1.0, "x", 3.0], [1.0, 2.0, 3.0]]}, ">= 0"),
        ({"retrieval": [[1.0, True, 3.0], [1.0, 2.0, 3.0]]}, ">= 0"),
        ({"retrieval_reasoning": [[0.1, 0.2], [0.3, 0.4]]}, "differ in shape"),
        ({"num_layers": 3}, "do not match"),
        ({"num_kv_heads": None}, "do not match"),
    ],
)
def test_load_rejects_bad_content(tmp_path, change, words):
    path = write(tmp_path, {**valid_document(), **change})
    with pytest.raises(ValueError, match=words) as error:
        HeadScores.load(path)
    assert path in str(error.value)  # the error names the file


@pytest.mark.parametrize("missing", ["retrieval", "retrieval_reasoning"])
def test_load_rejects_missing_arrays(tmp_path, missing):
    document = valid_document()
    del document[missing]
    with pytest.raises(ValueError, match=f"lacks '{missing}'"):
        HeadScores.load(write(tmp_path, document))


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2"])
def test_load_rejects_non_json(tmp_path, text):
    with pytest.raises(ValueError, match="not valid JSON"):
        HeadScores.load(write(tmp_path, text))


@pytest.mark.parametrize("text", ["[1, 2]", '"scores"', "null"])
def test_load_rejects_json_of_the_wrong_kind(tmp_path, text):
    with pytest.raises(ValueError, match="not a head-scores file"):
        HeadScores.load(write(tmp_path, text))


def test_load_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        HeadScores.load(tmp_path / "nowhere.json")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_scores_must_be_finite(value):
    with pytest.raises(ValueError, match="finite"):
        HeadScores("m", [[1.0, value]], [[1.0, 1.0]])
