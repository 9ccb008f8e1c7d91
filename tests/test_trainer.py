"""`transformers.Trainer` fine-tunes the head and gate of a loaded model; the VLM stays bit-identical."""

import datasets
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, Trainer, TrainingArguments

from emovlm_kd.collator import ImageClassificationCollator


def _colour_dataset(num_per_class=8):
    colours = [(220, 30, 30), (30, 200, 40), (40, 40, 220)]
    images, labels = [], []
    for label, colour in enumerate(colours):
        for i in range(num_per_class):
            shade = tuple(max(0, min(255, c + 6 * i - 20)) for c in colour)
            images.append(Image.new("RGB", (56 + 4 * i, 56), shade))
            labels.append(label)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["negative", "neutral", "positive"])}
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def _mean_loss(model, collator, dataset):
    model.eval()
    with torch.no_grad():
        batch = collator([dataset[i] for i in range(len(dataset))])
        return model(**batch).loss.item()


def test_trainer_lowers_loss_and_keeps_vlm_frozen(tiny_folder, tmp_path):
    model = AutoModelForImageClassification.from_pretrained(tiny_folder, trust_remote_code=True)
    image_processor = AutoImageProcessor.from_pretrained(tiny_folder, trust_remote_code=True)
    dataset = _colour_dataset()
    collator = ImageClassificationCollator(image_processor)
    vlm_before = {name: tensor.clone() for name, tensor in model.vlm.state_dict().items()}
    head_before = {name: tensor.clone() for name, tensor in model.head.state_dict().items()}
    loss_before = _mean_loss(model, collator, dataset)

    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        per_device_train_batch_size=6,
        num_train_epochs=10,
        learning_rate=5e-2,
        remove_unused_columns=False,
        report_to=[],
        save_strategy="no",
        logging_steps=4,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()

    loss_after = _mean_loss(model, collator, dataset)
    print(f"loss before {loss_before:.4f} after {loss_after:.4f}")
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)
    for name, tensor in model.vlm.state_dict().items():
        assert torch.equal(tensor, vlm_before[name]), f"VLM weight {name} changed"
    assert any(not torch.equal(t, head_before[n]) for n, t in model.head.state_dict().items())
