"""Batch collation for `transformers.Trainer` and plain DataLoaders over image datasets."""

import torch


class ImageClassificationCollator:
    """Turn a list of `{image_column: PIL image or path, label_column: int}` examples into model inputs + `labels`.

    The image processor does the padding (left-padded prompts, concatenated patches), so batches of images of
    different sizes work. Extra per-example tensors (e.g. cached `teacher_logits`) are stacked when present.
    """

    def __init__(self, image_processor, image_column: str = "image", label_column: str = "label", extra_columns=()):
        self.image_processor = image_processor
        self.image_column = image_column
        self.label_column = label_column
        self.extra_columns = tuple(extra_columns)

    def __call__(self, examples: list[dict]) -> dict:
        batch = dict(self.image_processor([example[self.image_column] for example in examples], return_tensors="pt"))
        if self.label_column in examples[0]:
            batch["labels"] = torch.tensor([int(example[self.label_column]) for example in examples])
        for column in self.extra_columns:
            batch[column] = torch.stack([torch.as_tensor(example[column]) for example in examples])
        return batch


__all__ = ["ImageClassificationCollator"]
