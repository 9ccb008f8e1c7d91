"""The examples of an exported repo's Hub page: which test images, copied where, with which precomputed outputs.

The hosted widget of the Hub does not run custom code, so the card carries precomputed examples instead: a few test
images (one per class by default, at most `MAX_WIDGET_IMAGES`) are copied into `widget/`, and the card's `widget:`
metadata gives each one's true class (`example_title`) and the exported model's own `[{label, score}]` for it
(`output`), computed by its image-classification pipeline at export time. Widget images come only from the dataset's
test split (a run without one gets none, unless files are named): no training or validation image is ever copied
into the repo. Their file names go through `safe_file_name`, so a class name such as `../../x` never leaves `widget/`.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

from emovlm_kd.run_dir import DataError, safe_file_name
from emovlm_kd.sources import WEB_IMAGE_FORMATS, web_image

logger = logging.getLogger(__name__)

WIDGET_DIR = "widget"
MAX_WIDGET_IMAGES = 8


@dataclass
class WidgetImage:
    """An example of the Hub page: the encoded image, its file name in `widget/` and its title (the true class)."""

    data: bytes
    name: str
    title: str


def widget_images(data, class_names: list[str], count: int | None = None, files=()) -> list[WidgetImage]:
    """`files` (titled by file name), else `count` test images of `data`: by default one per class, at most
    `MAX_WIDGET_IMAGES`; the first images of each class in turn when more are asked for. Never an image of the train
    or val split: without a test split, no widget images (the Hub page then shows none)."""
    if files:
        return [
            WidgetImage(Path(path).read_bytes(), safe_file_name(Path(path).name), Path(path).stem) for path in files
        ]
    count = min(len(class_names), MAX_WIDGET_IMAGES) if count is None else count
    if data is None or count <= 0:
        return []
    split = "test"
    if split not in data.splits:
        logger.info("No widget images: the dataset has no test split (only test images are copied into the repo)")
        return []
    by_class = {label: [] for label in range(len(class_names))}
    for index, label in enumerate(data.column(split, "label")):
        by_class[label].append(index)
    chosen = []
    for rank in range(max(len(indices) for indices in by_class.values())):
        chosen += [(label, indices[rank]) for label, indices in by_class.items() if rank < len(indices)]
    examples = []
    for label, index in chosen[:count]:
        name = safe_file_name(Path(data.key(split, index).replace("[", "-").rstrip("]")).name)
        folder = safe_file_name(class_names[label])  # labels are data: never a path
        examples.append(WidgetImage(data.image_bytes(split, index), f"{folder}/{name}", class_names[label]))
    return examples


def write_widget(output: Path, model, image_processor, examples: list[WidgetImage]) -> list[dict]:
    """Copy the examples into `<output>/widget/` and return the card's `widget:` entries, with the outputs of the
    model's image-classification pipeline on the written files."""
    from pipeline_emovlm_kd import EmoVLMKDImageClassificationPipeline

    classifier = EmoVLMKDImageClassificationPipeline(model=model, image_processor=image_processor)
    widget = []
    for example in examples:
        data, image_format = web_image(example.data, example.name)  # too large or not web-safe: a JPEG
        source = Path(WIDGET_DIR) / Path(example.name).with_suffix(WEB_IMAGE_FORMATS[image_format][1])
        if not (output / source).resolve().is_relative_to((output / WIDGET_DIR).resolve()):
            raise DataError(f"Widget file name {example.name!r} would leave {str(output / WIDGET_DIR)!r}")
        (output / source).parent.mkdir(parents=True, exist_ok=True)
        (output / source).write_bytes(data)
        outputs = classifier(str(output / source), top_k=model.config.num_labels)
        scores = [{"label": item["label"], "score": round(float(item["score"]), 4)} for item in outputs]
        widget.append({"src": source.as_posix(), "example_title": example.title, "output": scores})
    return widget


__all__ = ["MAX_WIDGET_IMAGES", "WIDGET_DIR", "WidgetImage", "widget_images", "write_widget"]
