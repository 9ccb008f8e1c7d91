"""The config: round trips (in the spirit of transformers' ConfigTester) and the published prompts, defined once."""

import json

import pytest

from configuration_emovlm_kd import EmoVLMKDConfig, example_labels
from emovlm_kd.testing import make_images
from processing_emovlm_kd import chat_token_ids, render_chat

MIKELS_REFERENCE_ORDER = ["amusement", "excitement", "sadness", "fear", "contentment", "anger", "disgust", "awe"]
EMOTION6 = ["anger", "disgust", "fear", "joy", "sadness", "surprise"]

# The reference's strings (github.com/sange1104/EmoVLM-KD, data_utils.py and train_vlm.py), written out.
REFERENCE_SYSTEM_MESSAGE = "You are an AI visual assistant, and you are seeing a single image."
REFERENCE_OBSERVATION = (
    "Observe the image and describe key elements of the image. Example: The dark sky serves as a dramatic background, "
    "emphasizing people holding tools. Objects resembling agricultural tools appear threatening, creating tension. "
    "The synchronized movement of the crowd and strong silhouette effects contribute to a striking atmosphere. The "
    "high contrast highlights the shapes of the tools as primary visual elements."
)
REFERENCE_INFERENCE = (
    "Observe the image and describe the process of inferring the emotions conveyed in the image. Example: The crowd "
    "holding various tools suggests intense energy and the excitement of collective action. The silhouette "
    "contrasting with the dark sky evokes tension, potentially eliciting anxiety or fear. The threatening shapes of "
    "the tools and the collective behavior may hint at anger or hostility. The overall scene's organized yet "
    "uncertain atmosphere limits the possibility of comfort."
)
REFERENCE_CLASSIFICATION = {  # get_final_task_message: an indented triple-quoted f-string
    "fi/emoset": (
        "Observe the image and select the emotion category that best matches this image from the following 8 "
        "categories ['amusement', 'excitement', 'sadness', 'fear', 'contentment', 'anger', 'disgust', 'awe']. Answer "
        "in dictionary form as follows\n        {'emotion':'anger'} or {'emotion':'amusement'}\n        "
    ),
    "emotion6": (
        "Observe the image and select the emotion category that best matches this image from the following 6 "
        "categories ['anger', 'disgust', 'fear', 'joy', 'sadness', 'surprise']. Answer in dictionary form as "
        "follows\n        {'emotion':'anger'} or {'emotion':'disgust'}\n        "
    ),
    "flickr/instagram": (
        "Observe the image and select the emotion category that best matches this image from the following 2 "
        "categories ['positive', 'negative']. Answer in dictionary form as follows\n        "
        "{'emotion':'positive'} or {'emotion':'negative'}\n        "
    ),
}
PRESET_CLASSES = {
    "fi/emoset": MIKELS_REFERENCE_ORDER,
    "emotion6": EMOTION6,
    "flickr/instagram": ["positive", "negative"],
}


def config_for(labels, **kwargs) -> EmoVLMKDConfig:
    return EmoVLMKDConfig(id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}, **kwargs)


def test_default_prompts_are_the_reference_strings():
    config = config_for(["positive", "negative"])
    assert config.system_message == REFERENCE_SYSTEM_MESSAGE
    assert config.prompt_text("observation") == REFERENCE_OBSERVATION
    assert config.prompt_text("inference") == REFERENCE_INFERENCE
    assert config.answer_text("negative") == "{'emotion': 'negative'}"  # what the reference trains on


@pytest.mark.parametrize("preset", REFERENCE_CLASSIFICATION)
def test_classification_prompt_of_the_reference_datasets(preset):
    assert config_for(PRESET_CLASSES[preset]).prompt_text("classification") == REFERENCE_CLASSIFICATION[preset]


def test_example_answers_for_other_class_lists():
    assert example_labels(["joy", "anger", "fear"]) == ["anger", "joy"]
    assert example_labels(["calm", "tense", "sad"]) == ["calm", "tense"]
    prompt = config_for(["calm", "tense", "sad"]).prompt_text()
    assert "following 3 categories ['calm', 'tense', 'sad']." in prompt
    assert "{'emotion':'calm'} or {'emotion':'tense'}" in prompt
    chosen = config_for(["calm", "tense", "sad"], classification_example_labels=["sad", "calm"]).prompt_text()
    assert "{'emotion':'sad'} or {'emotion':'calm'}" in chosen
    with pytest.raises(ValueError, match="classification_example_labels"):
        config_for(["calm", "tense"], classification_example_labels=["calm", "joy"])


def test_chat_messages_open_with_the_system_turn_and_put_text_before_the_image():
    config = config_for(EMOTION6)
    for task in ("observation", "inference", "classification"):
        system, user = config.chat_messages(task)
        assert system == {"role": "system", "content": [{"type": "text", "text": REFERENCE_SYSTEM_MESSAGE}]}
        assert user["role"] == "user"
        assert user["content"] == [{"type": "text", "text": config.prompt_text(task)}, {"type": "image"}]
    assert [m["role"] for m in config_for(EMOTION6, system_message="").chat_messages("inference")] == ["user"]
    with pytest.raises(ValueError, match="Unknown task"):
        config.chat_messages("reasoning")


def test_prompt_ids_around_the_image_are_what_the_vlm_processor_makes(tiny):
    model, image_processor, vlm_processor = tiny
    image = make_images()[0]
    for task in ("classification", "inference"):
        prefix, suffix = chat_token_ids(model.config, task, vlm_processor)
        assert chat_token_ids(model.config, task, model.tokenizer) == (prefix, suffix)  # processor or tokenizer
        text = render_chat(model.config, task, vlm_processor)
        whole = vlm_processor(text=[text], images=[image], return_tensors="pt")
        image_tokens = int((whole["input_ids"] == vlm_processor.image_token_id).sum())
        assert whole["input_ids"][0].tolist() == prefix + [vlm_processor.image_token_id] * image_tokens + suffix
    # the exported image processor writes exactly the classification chat
    assert (image_processor.prompt_prefix_ids, image_processor.prompt_suffix_ids) == tuple(
        chat_token_ids(model.config, "classification", vlm_processor)
    )
    text = vlm_processor.tokenizer.decode(image_processor.prompt_prefix_ids)
    assert text.startswith(f"<|im_start|>system\n{REFERENCE_SYSTEM_MESSAGE}<|im_end|>")
    with pytest.raises(TypeError, match="EmoVLMKDConfig"):  # a prompt string alone no longer defines the chat
        type(image_processor).from_vlm_processor(vlm_processor, model.config.prompt_text())


def test_stage1_encoder_and_the_model_share_a_custom_prompt():
    """A custom classification prompt given to instruction tuning is the one the model is then scored with."""
    from emovlm_kd.instruction_tasks import InstructionEncoder
    from emovlm_kd.tiny import build_tiny_model

    classes = ["calm", "tense"]
    custom = {"classification_prompt": "Pick one of <label_list>.", "system_message": "Look closely."}
    model, image_processor, vlm_processor = build_tiny_model(classes, **custom)
    encoder = InstructionEncoder(vlm_processor, classes, **custom)
    image = make_images()[0]
    item = encoder.encode(image, "classification", 1)
    scored = image_processor([image])
    prompt = item["input_ids"][item["labels"] == -100]
    assert prompt.tolist() == scored["input_ids"][0].tolist()
    assert "Pick one of ['calm', 'tense']." in vlm_processor.tokenizer.decode(prompt)
    assert "Look closely." in vlm_processor.tokenizer.decode(prompt)


def test_config_round_trips_through_dict_json_and_folder(tmp_path):
    config = config_for(
        MIKELS_REFERENCE_ORDER,
        gate_type="moe",
        head_hidden_sizes=[64, 32],
        initializer_range=0.05,
        classification_example_labels=["awe", "fear"],
        answer_token_ids=[[1, 2]] * 8,
    )
    from_dict = EmoVLMKDConfig.from_dict(config.to_dict())
    assert from_dict.to_dict() == config.to_dict()
    assert EmoVLMKDConfig.from_dict(from_dict.to_dict()) == from_dict

    config.to_json_file(tmp_path / "config.json")
    assert EmoVLMKDConfig.from_json_file(tmp_path / "config.json").to_dict() == config.to_dict()
    assert json.loads(config.to_json_string())["gate_type"] == "moe"

    config.save_pretrained(tmp_path / "folder")
    loaded = EmoVLMKDConfig.from_pretrained(tmp_path / "folder")
    assert loaded.to_diff_dict() == config.to_diff_dict()
    assert loaded.prompt_text() == config.prompt_text() and loaded.labels == MIKELS_REFERENCE_ORDER
    assert loaded.vlm_config.model_type == "qwen2_vl" and loaded.auto_map["AutoModel"].startswith("modeling_emovlm_kd")


def test_config_defaults_and_bad_values():
    config = EmoVLMKDConfig()  # can be built without arguments (two placeholder classes)
    assert config.num_labels == 2 and config.initializer_range == 0.02 and config.gate_type == "concat_linear"
    with pytest.raises(ValueError, match="answer_format"):
        config_for(["a", "b"], answer_format="{'emotion': '?'}")
    with pytest.raises(ValueError, match="generate_top_p"):
        config_for(["a", "b"], generate_top_p=0.0)
