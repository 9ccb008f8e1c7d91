"""Fine-tune the distilled head and the gate of an EmoVLM-KD model with `transformers.Trainer` (the VLM stays frozen).

    python examples/finetune_with_trainer.py                          # tiny random model, generated data, offline
    python examples/finetune_with_trainer.py MODEL --data DIR --output-dir OUT --epochs 3 --learning-rate 1e-4

MODEL is a model folder or Hub repo id. DIR is an ImageFolder tree (`train/<class>/*.jpg`, and `test/` or
`validation/` for evaluation) or any `datasets` source the training scripts take with `--dataset` (a save_to_disk
folder, parquet/arrow files, a Hub dataset id) with one `Image` and one `ClassLabel` column, whose class names are
the model's labels. The full retraining recipe (teacher,
distillation from cached features, gate) is in `train/`; this shows the model is an ordinary Trainer citizen.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_dataset
from sklearn.metrics import accuracy_score
from transformers import (
    AutoModelForImageClassification,
    AutoProcessor,
    Trainer,
    TrainingArguments,
    pipeline,
)

from emovlm_kd.collator import ImageClassificationCollator


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="model folder or Hub repo id (default: a tiny random model)")
    parser.add_argument("--data", help="ImageFolder tree or any datasets source (default: a small generated dataset)")
    parser.add_argument("--output-dir", help="where the fine-tuned model is saved (default: a temporary folder)")
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--learning-rate", type=float, help="default: 3e-2 for the tiny model, 1e-4 for a given one")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def build_tiny_model_folder(folder: Path) -> str:
    """A tiny random-weight model saved as a model folder, built offline."""
    from emovlm_kd.tiny import save_tiny_model_folder

    return save_tiny_model_folder(folder, ["negative", "neutral", "positive"])


def generated_dataset(labels: list[str], train_per_class: int = 12, test_per_class: int = 6) -> DatasetDict:
    """Images whose dominant colour is the class's (plus noise and a distractor square): a learnable signal."""
    from emovlm_kd.testing import make_image

    rng = np.random.default_rng(0)
    features = Features({"image": Image(), "label": ClassLabel(names=labels)})

    def split(per_class):
        rows = [(make_image(label, rng), label) for label in range(len(labels)) for _ in range(per_class)]
        return Dataset.from_dict({"image": [r[0] for r in rows], "label": [r[1] for r in rows]}, features=features)

    return DatasetDict(train=split(train_per_class), test=split(test_per_class))


def load_data(data: str, label2id: dict[str, int]) -> DatasetDict:
    """An ImageFolder tree or a `datasets` source as a DatasetDict with `image` and `label` columns, whose label ids
    follow the model's `label2id`."""
    from emovlm_kd.sources import detect_source, open_source, pick_column, pick_image_column

    kind = detect_source(data)
    dataset = load_dataset("imagefolder", data_dir=data) if kind == "imagefolder" else open_source(kind, data)
    features = dataset["train"].features
    image_column = pick_image_column(features, None, data)
    label_column = pick_column(features, None, "a ClassLabel column", ClassLabel, "`ClassLabel`", data)
    dataset = dataset.select_columns([image_column, label_column])
    renames = {old: new for old, new in ((image_column, "image"), (label_column, "label")) if old != new}
    dataset = dataset.rename_columns(renames)
    names = dataset["train"].features["label"].names
    if sorted(names) != sorted(label2id):
        raise ValueError(f"The classes of {data!r} {names} are not the model's labels {sorted(label2id)}")
    return dataset.align_labels_with_mapping(label2id, "label")


def compute_metrics(prediction) -> dict:
    # The model returns (logits, head_logits, vlm_scores, ...): accuracy of the fused output and of each branch.
    logits, head_logits, vlm_scores = prediction.predictions[:3]
    labels = prediction.label_ids
    return {
        "accuracy": accuracy_score(labels, logits.argmax(-1)),
        "head_accuracy": accuracy_score(labels, head_logits.argmax(-1)),
        "vlm_accuracy": accuracy_score(labels, vlm_scores.argmax(-1)),
    }


def main():
    args = parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="emovlm-kd-finetune-"))
    model_path = args.model or build_tiny_model_folder(workdir / "model")
    output_dir = args.output_dir or str(workdir / "finetuned")
    learning_rate = args.learning_rate or (1e-4 if args.model else 3e-2)  # a random tiny head needs big steps

    model = AutoModelForImageClassification.from_pretrained(model_path, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)  # image processor + tokenizer
    model.set_trainable(head=True, gate=True, vlm=False)  # the VLM is frozen: only the head and gate learn
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]

    dataset = load_data(args.data, model.config.label2id) if args.data else generated_dataset(labels)
    eval_split = next((name for name in ("test", "validation") if name in dataset), "train")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"{len(dataset['train'])} training images, {len(dataset[eval_split])} {eval_split} images, classes {labels}")
    print(f"trainable parameters: {trainable:,} of {total:,} (head + gate)")

    training_args = TrainingArguments(
        output_dir=str(workdir / "trainer"),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=learning_rate,
        weight_decay=1e-4,
        lr_scheduler_type="constant",
        remove_unused_columns=False,  # the collator needs the raw "image" column
        eval_strategy="no",
        save_strategy="no",
        logging_steps=5,
        report_to="none",
        dataloader_pin_memory=torch.cuda.is_available(),
        seed=args.seed,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"],
        eval_dataset=dataset[eval_split],
        data_collator=ImageClassificationCollator(processor.image_processor),
        compute_metrics=compute_metrics,
        processing_class=processor,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    for name in ("loss", "accuracy", "head_accuracy", "vlm_accuracy"):
        print(f"{eval_split} {name:<14} before {before[f'eval_{name}']:.4f}  after {after[f'eval_{name}']:.4f}")

    trainer.save_model(output_dir)  # weights, config, remote code and the processor (image processor, tokenizer)
    classifier = pipeline("image-classification", model=output_dir, trust_remote_code=True)
    example = dataset[eval_split][0]
    print(f"reloaded from {output_dir}: {classifier(example['image'], top_k=1)[0]} (true: {labels[example['label']]})")


if __name__ == "__main__":
    main()
