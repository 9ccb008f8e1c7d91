"""The feature cache: sampled VLM answers are seeded per image, so they do not depend on the feature batch size or on
how the images are split between processes (neither is part of the cache key)."""

import types

import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from emovlm_kd.cache import extract_features
from emovlm_kd.tiny import build_tiny_model

NUM_IMAGES = 7


class SamplingModel(torch.nn.Module):
    """The interface `cache.vlm_features` drives, with a 'generated answer' drawn from each row's generator: the
    draws expose exactly which generator every image got."""

    config = types.SimpleNamespace(vlm_branch_mode="generate", num_labels=5)

    def get_image_embeds(self, pixel_values, image_grid_thw):
        return [pixel_values[i : i + 1] for i in range(len(pixel_values))]

    def pool_image_embeds(self, image_embeds):
        return torch.cat(image_embeds)

    def score_answers(self, input_ids, attention_mask, mm_token_type_ids, image_grid_thw, image_embeds):
        return torch.zeros(len(input_ids), self.config.num_labels)

    def generate_answers(self, *branch, generator):
        draws = torch.stack([torch.rand(self.config.num_labels, generator=g) for g in generator])
        return draws, [""] * len(draws)


def fake_processor(images, return_tensors="pt"):
    values = torch.tensor([[float(image.getpixel((0, 0))[0])] for image in images])
    rows = torch.zeros(len(images), 2, dtype=torch.long)
    return types.SimpleNamespace(
        to=lambda device: {
            "pixel_values": values,
            "image_grid_thw": rows,
            "input_ids": rows,
            "attention_mask": rows,
            "mm_token_type_ids": rows,
        }
    )


def image_of(index: int) -> Image.Image:
    return Image.new("RGB", (4, 4), (index * 10, 0, 0))


@pytest.mark.parametrize("batch_size", [1, 2, 3, NUM_IMAGES])
def test_sampled_answers_are_seeded_per_image(batch_size):
    """Image `i` gets the generator seeded by (seed keys, i): the same draws for any feature batch size (and so on
    any process, which computes whole batches of global indices)."""
    state = Accelerator(cpu=True)
    run = {
        size: extract_features(
            state, image_of, NUM_IMAGES, SamplingModel(), fake_processor, batch_size=size, seed_keys=(42, 0)
        )
        for size in (NUM_IMAGES, batch_size)
    }
    full, batched = run[NUM_IMAGES], run[batch_size]
    torch.testing.assert_close(batched["vlm_generated"], full["vlm_generated"], rtol=0, atol=0)
    assert full["image_embeds"].flatten().tolist() == [10.0 * i for i in range(NUM_IMAGES)]  # in order
    assert len(set(map(tuple, full["vlm_generated"].tolist()))) == NUM_IMAGES  # every image its own draws
    other_epoch = extract_features(
        state, image_of, NUM_IMAGES, SamplingModel(), fake_processor, seed_keys=(42, 1))
    assert not torch.equal(other_epoch["vlm_generated"], full["vlm_generated"])


def test_a_rows_sample_does_not_depend_on_its_batch():
    """The real model: with one generator per row, each image's sampled tokens are the same alone or in a batch."""
    model, image_processor, _ = build_tiny_model(
        vlm_branch_mode="generate", generate_do_sample=True, generate_temperature=5.0, max_new_tokens=6
    )
    images = [Image.new("RGB", (28 * (1 + i), 56), (40 * i, 90, 200)) for i in range(3)]

    def tokens(batch, seeds):
        inputs = image_processor(batch, return_tensors="pt")
        embeds = model.get_image_embeds(inputs["pixel_values"], inputs["image_grid_thw"])
        branch = (inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"], inputs["image_grid_thw"])
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        return model.generate_tokens(*branch, embeds, generator=generators)

    together = tokens(images, [11, 12, 13])
    alone = [tokens([image], [seed])[0] for image, seed in zip(images, [11, 12, 13])]
    assert together == alone
    assert tokens(images, [21, 22, 23]) != together  # the draws come from those generators


TWO_PROCESS_SCRIPT = """
import sys
import torch
from accelerate import Accelerator
from safetensors.torch import save_file
sys.path.insert(0, {tests!r})
from test_cache import NUM_IMAGES, SamplingModel, fake_processor, image_of
from emovlm_kd.cache import extract_features
from emovlm_kd.processes import end_processes

accelerator = Accelerator(cpu=True)
for batch_size in (1, 2, 3):
    features = extract_features(
        accelerator, image_of, NUM_IMAGES, SamplingModel(), fake_processor, batch_size=batch_size, seed_keys=(42, 0)
    )
    if accelerator.is_main_process:
        save_file({{"answers": features["vlm_generated"].contiguous()}}, sys.argv[1] + f"-{{batch_size}}.safetensors")
end_processes()  # as the stages do: a gloo group left alive can abort the process at exit
"""


@pytest.mark.slow
def test_sampled_answers_are_the_same_on_two_processes(tmp_path):
    """Split across 2 processes (gloo), every image gets the same sampled answer as on one, for any batch size."""
    from pathlib import Path

    from safetensors.torch import load_file

    from emovlm_kd.testing import launch_two_processes

    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS_SCRIPT.format(tests=str(Path(__file__).resolve().parent)))
    launch_two_processes(script, [str(tmp_path / "two")], tmp_path / "two.log")
    one = extract_features(
        Accelerator(cpu=True), image_of, NUM_IMAGES, SamplingModel(), fake_processor, seed_keys=(42, 0)
    )["vlm_generated"]
    for batch_size in (1, 2, 3):
        saved = load_file(tmp_path / f"two-{batch_size}.safetensors")["answers"]
        torch.testing.assert_close(saved, one, rtol=0, atol=0)
