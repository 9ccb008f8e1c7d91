"""Explanations on demand: the pipeline's opt-in `explain`, the classes a text names, and the templated instruction
data that lets the quickstart's stage 1 teach the tiny VLM to explain."""

import pytest
from transformers import pipeline

from configuration_emovlm_kd import EmoVLMKDConfig, label_pattern
from emovlm_kd.instruction_records import done_examples
from emovlm_kd.testing import make_imagefolder, make_images, templated_explanation, write_instruction_data


@pytest.fixture(scope="module")
def classifier(tiny_folder):
    return pipeline("image-classification", model=str(tiny_folder), trust_remote_code=True)


@pytest.fixture
def language_model_calls(classifier):
    """Counts of the vision tower's and the language model's forward passes and of generation calls during a test."""
    model = classifier.model
    calls = {"vision": 0, "language_model": 0, "generate": 0}
    handles = [
        module.register_forward_hook(lambda *args, name=name: calls.__setitem__(name, calls[name] + 1))
        for name, module in (("vision", model.vlm.model.visual), ("language_model", model.vlm.model.language_model))
    ]
    generate_tokens = model.generate_tokens

    def counted(*args, **kwargs):
        calls["generate"] += 1
        return generate_tokens(*args, **kwargs)

    model.generate_tokens = counted
    yield calls
    for handle in handles:
        handle.remove()
    del model.generate_tokens


def test_labels_named_in_uses_whole_words_in_order_of_mention():
    config = EmoVLMKDConfig(id2label={0: "sad", 1: "sadness", 2: "very_happy", 3: "awe"}, label2id={})
    assert config.labels_named_in("Sadness, then AWE.") == ["sadness", "awe"]
    assert config.labels_named_in("awe first, and a sad face; very-happy or very happy") == [
        "awe",
        "sad",
        "very_happy",
    ]
    # not inside other words: "awesome", "sadly", "unhappy"
    assert config.labels_named_in("An awesome view, sadly not very unhappy.") == []
    assert config.labels_named_in("") == []
    assert label_pattern("very_happy").fullmatch("Very  HAPPY")


def test_classification_without_explain_never_generates(classifier, language_model_calls):
    image = make_images()[0]
    result = classifier(image, top_k=None)
    assert [sorted(entry) for entry in result] == [["label", "score"]] * 3
    assert language_model_calls == {"vision": 1, "language_model": 1, "generate": 0}  # one scoring pass
    classifier(make_images(), top_k=1, batch_size=2)
    assert language_model_calls == {"vision": 3, "language_model": 3, "generate": 0}  # per batch of 2 (3 images)


def test_explain_adds_the_text_and_leaves_the_scores_identical(classifier, language_model_calls):
    images = make_images()
    plain = classifier(images, top_k=None)
    assert language_model_calls["generate"] == 0
    explained = classifier(images, top_k=None, explain=True, max_new_tokens=6)
    # one generation per image (batch size 1), from the classification's vision pass
    assert language_model_calls["generate"] == len(images) and language_model_calls["vision"] == 2 * len(images)
    model, image_processor = classifier.model, classifier.image_processor
    for image, scores, result in zip(images, plain, explained):
        assert sorted(result) == ["explanation", "explanation_labels", "predictions"]
        assert result["predictions"] == scores  # exactly, not approximately
        assert result["explanation"] == model.explain(**image_processor([image]), max_new_tokens=6)[0]
        assert result["explanation_labels"] == model.config.labels_named_in(result["explanation"])

    # batched: the same scores as the batched call without explanations, one text per image
    batched_plain = classifier(images, top_k=2, batch_size=2)
    batched = classifier(images, top_k=2, batch_size=2, explain=True, max_new_tokens=6)
    assert [result["predictions"] for result in batched] == batched_plain
    assert all(isinstance(result["explanation"], str) for result in batched)

    single = classifier(images[1], explain=True, explain_task="observation", max_new_tokens=6)
    observation = model.explain(**image_processor([images[1]]), task="observation", max_new_tokens=6)[0]
    assert single["explanation"] == observation and single["predictions"] == classifier(images[1])


def test_an_explanation_naming_another_class_is_returned_verbatim_and_flagged(classifier, monkeypatch):
    image = make_images()[0]
    predicted = classifier(image, top_k=1)[0]["label"]
    other = next(label for label in classifier.model.config.labels if label != predicted)
    text = f"Surely {other.upper()}: nothing {predicted}-like here ({predicted}s do not count)."
    monkeypatch.setattr(classifier.model, "explain", lambda *args, **kwargs: [text])
    result = classifier(image, top_k=1, explain=True)
    assert result["explanation"] == text  # never rewritten
    assert result["explanation_labels"] == [other, predicted]
    assert result["predictions"][0]["label"] == predicted  # the app sees the disagreement

    monkeypatch.setattr(classifier.model, "explain", lambda *args, **kwargs: ["No emotion word at all."])
    assert classifier(image, explain=True)["explanation_labels"] == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"explain": "yes"}, "explain must be True or False"),
        ({"explain": True, "explain_task": "classification"}, "explain_task must be one of"),
        ({"explain": True, "max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
        ({"max_new_tokens": 8}, r"\['max_new_tokens'\] only apply with explain=True"),
        ({"explain": False, "explain_task": "observation"}, r"\['explain_task'\] only apply with explain=True"),
    ],
)
def test_bad_explanation_arguments(classifier, kwargs, message):
    with pytest.raises(ValueError, match=message):
        classifier(make_images()[0], **kwargs)


def test_templated_instruction_data_has_the_records_of_stage_0(tmp_path):
    classes = ["positive", "negative", "neutral"]  # not sorted: the order of make_imagefolder fixes the colours
    root = make_imagefolder(tmp_path / "data", classes, per_class=2, splits=("train",))
    path = write_instruction_data(root, tmp_path / "run" / "instruction_data.jsonl", classes)
    records = done_examples(path)
    assert sorted(records) == sorted(p.relative_to(root).as_posix() for p in (root / "train").rglob("*.*"))
    for image, record in records.items():
        label = classes.index(record["label"])
        assert image.startswith(f"train/{record['label']}/")
        assert {key: record[key] for key in ("observation", "reasoning")} == templated_explanation(label)
    texts = [templated_explanation(label) for label in range(len(classes))]
    assert len({text["observation"] for text in texts}) == len({text["reasoning"] for text in texts}) == 3
    # like stage 0's accepted answers, no text names a class (of this dataset or of the paper's)
    config = EmoVLMKDConfig(id2label=dict(enumerate(classes + ["fear", "awe", "sadness", "excitement"])))
    assert not any(config.labels_named_in(text) for pair in texts for text in pair.values())
    # deterministic: the same bytes again
    first = path.read_bytes()
    write_instruction_data(root, path, classes)
    assert path.read_bytes() == first
    with pytest.raises(ValueError, match="No class folder"):
        write_instruction_data(root, tmp_path / "other.jsonl", ["cats", "dogs"])
