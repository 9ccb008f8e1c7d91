"""The three instruction-tuning tasks of EmoVLM-KD and their encoding into VLM training batches.

Per training image:
  * observation: describe the key visual elements (answer: the instruction data's `observation`);
  * inference: explain the emotional reasoning (answer: the instruction data's `reasoning`);
  * classification: the EmoVLM-KD classification prompt, answered `{'emotion': '<label>'}`.

The chats are `EmoVLMKDConfig.chat_messages(task)` (the reference's system message and task prompts, text before
the image), the same that the exported model scores and explains with, and the classification answers are
`tokenize_answers`' (answer tokens + end-of-turn), so instruction tuning raises precisely the likelihoods the VLM
branch measures. Every answer ends with the end-of-turn token. By default only answer tokens carry labels (the
prompt, image placeholders and padding are -100); `loss_on="all"` puts the whole sequence in the loss as the
reference does (its `collate_fn` in train_vlm.py), every token but the padding and the image tokens (placeholders,
vision start and end).
"""

from dataclasses import dataclass

import torch

from configuration_emovlm_kd import TASKS, EmoVLMKDConfig
from image_processing_emovlm_kd import DEFAULT_MAX_IMAGE_SIDE, prepare_image
from modeling_emovlm_kd import end_of_turn_id, tokenize_answers
from processing_emovlm_kd import render_chat

IGNORE_INDEX = -100
LOSS_ON = ("answer", "all")
# Tokens never in the loss, also with `loss_on="all"`: the image placeholders and the vision markers around them.
IMAGE_TOKENS = ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>")


@dataclass(frozen=True)
class InstructionExample:
    """One training example: an image (its row in the training split), a task, and the answer (text for
    observation / inference, the class index for classification)."""

    row: int
    task: str
    answer: str | int


def build_examples(labels: list[int], explanations: dict[int, dict] | None = None) -> list[InstructionExample]:
    """Classification for every image (row `i` has label `labels[i]`); observation and inference for the rows with
    an explanation.

    `explanations` maps a row to a record with non-empty `observation` and `reasoning` strings.
    """
    explanations = explanations or {}
    examples = []
    for row, label in enumerate(labels):
        record = explanations.get(row)
        if record is not None:
            examples.append(InstructionExample(row, "observation", record["observation"]))
            examples.append(InstructionExample(row, "inference", record["reasoning"]))
        examples.append(InstructionExample(row, "classification", int(label)))
    return examples


class InstructionEncoder:
    """Turns examples into VLM inputs: `input_ids`, `attention_mask`, `mm_token_type_ids`, `pixel_values`,
    `image_grid_thw` and `labels`, right-padded to the longest example of a batch.

    Args:
        processor: the VLM's processor (e.g. `Qwen2VLProcessor`).
        class_names: the classes in label order (they make the classification prompt and answers).
        max_answer_tokens: longer observation / inference answers are cut to this many tokens (before the
            end-of-turn token).
        max_image_side: images are capped to this longest side as the exported image processor does (its
            `max_image_side`): training sees what inference sees.
        loss_on: `"answer"` (labels on answer tokens only) or `"all"` (the whole sequence but padding and image
            tokens, as the reference computes its loss).
        prompt_settings: `EmoVLMKDConfig` prompt fields (`system_message`, `classification_prompt`,
            `answer_format`, ...) to train on instead of the reference's; give the model the same ones.
    """

    def __init__(
        self,
        processor,
        class_names: list[str],
        max_answer_tokens: int = 512,
        max_image_side: int | None = DEFAULT_MAX_IMAGE_SIDE,
        loss_on: str = "answer",
        **prompt_settings,
    ):
        if loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_image_side = max_image_side
        self.config = EmoVLMKDConfig(
            id2label=dict(enumerate(class_names)),
            label2id={name: i for i, name in enumerate(class_names)},
            **prompt_settings,
        )
        self.classification_answer_ids = tokenize_answers(self.tokenizer, self.config)
        self.end_token_id = end_of_turn_id(self.tokenizer)
        self.max_answer_tokens = max_answer_tokens
        self.loss_on = loss_on
        image_tokens = [self.tokenizer.convert_tokens_to_ids(token) for token in IMAGE_TOKENS]
        known = [token for token in image_tokens if token is not None and token != self.tokenizer.unk_token_id]
        self.image_token_ids = torch.tensor(sorted({*known, processor.image_token_id}))
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id

    def prompt_text(self, task: str) -> str:
        """The chat of `task` rendered with the processor's chat template, up to the assistant turn's header."""
        return render_chat(self.config, task, self.processor)

    def answer_ids(self, task: str, answer: str | int) -> list[int]:
        if task == "classification":
            return list(self.classification_answer_ids[answer])
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"][: self.max_answer_tokens]
        return ids + [self.end_token_id]

    def encode(self, image, task: str, answer: str | int) -> dict[str, torch.Tensor]:
        """One example, unpadded: 1-D `input_ids` / `mm_token_type_ids` / `labels`, and the image tensors. `image`
        is anything `prepare_image` takes (a path, a PIL image, ...): prepared as the exported model prepares it."""
        image = prepare_image(image, max_image_side=self.max_image_side)
        prompt = self.processor(images=[image], text=[self.prompt_text(task)], return_tensors="pt")
        answer_ids = torch.tensor(self.answer_ids(task, answer), dtype=torch.long)
        prompt_ids = prompt["input_ids"][0]
        if self.loss_on == "all":
            prompt_labels = prompt_ids.masked_fill(torch.isin(prompt_ids, self.image_token_ids), IGNORE_INDEX)
        else:
            prompt_labels = torch.full_like(prompt_ids, IGNORE_INDEX)
        return {
            "input_ids": torch.cat([prompt_ids, answer_ids]),
            "mm_token_type_ids": torch.cat([prompt["mm_token_type_ids"][0], torch.zeros_like(answer_ids)]),
            "labels": torch.cat([prompt_labels, answer_ids]),
            "pixel_values": prompt["pixel_values"],
            "image_grid_thw": prompt["image_grid_thw"],
        }

    def collate(self, encoded: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Right-pad a list of `encode` outputs into a batch (padding: pad token, mask 0, label -100)."""
        length = max(len(item["input_ids"]) for item in encoded)
        batch = {
            "input_ids": torch.full((len(encoded), length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(encoded), length), dtype=torch.long),
            "mm_token_type_ids": torch.zeros((len(encoded), length), dtype=torch.long),
            "labels": torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long),
        }
        for row, item in enumerate(encoded):
            size = len(item["input_ids"])
            for name in ("input_ids", "mm_token_type_ids", "labels"):
                batch[name][row, :size] = item[name]
            batch["attention_mask"][row, :size] = 1
        batch["pixel_values"] = torch.cat([item["pixel_values"] for item in encoded])
        batch["image_grid_thw"] = torch.cat([item["image_grid_thw"] for item in encoded])
        return batch


class InstructionDataset(torch.utils.data.Dataset):
    """Examples encoded on the fly; `image_of(row)` decodes a row's image (in the DataLoader's workers), e.g.
    `functools.partial(data.image, "train")` of the run's data."""

    def __init__(self, examples: list[InstructionExample], encoder: InstructionEncoder, image_of):
        self.examples, self.encoder, self.image_of = examples, encoder, image_of

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        example = self.examples[index]
        return self.encoder.encode(self.image_of(example.row), example.task, example.answer)


__all__ = [
    "IGNORE_INDEX",
    "LOSS_ON",
    "TASKS",
    "InstructionDataset",
    "InstructionEncoder",
    "InstructionExample",
    "build_examples",
]
