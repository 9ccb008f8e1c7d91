#!/usr/bin/env python
"""What padding the scoring pass to a multiple of 8 tokens costs or saves (`scoring_pad_multiple`).

The exact scoring runs one language-model pass over the prompt and the answer trie. `score_answers` pads that pass
with dummy nodes (never attended to, never read) up to a multiple of `EmoVLMKDForImageClassification.
scoring_pad_multiple` tokens; `tests/test_vlm_adapters.py` checks in float32 that no score changes. This script times
`score_answers` from the same image embeddings with the padding off (1) and on (8), interleaved, and the bare VLM
forward (the floor) for scale.

    python benchmarks/bench_scoring_padding.py --preset qwen2-vl-2b --dtype bfloat16 --threads 1 --clock cpu \
        --image-sizes 500x375 --runs 5 --tag cpu-qwen2-vl-2b
"""

import argparse
import statistics

import torch

from bench_utils import (
    MIKELS_LABELS,
    add_common_arguments,
    build_model,
    cap_images,
    check_arguments,
    machine_info,
    machine_line,
    markdown_table,
    parse_image_size,
    setup,
    size_name,
    spec_dict,
    synthetic_images,
    time_interleaved,
    to_device,
    vlm_floor_call,
    write_results,
)

MULTIPLES = (1, 8)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--image-sizes", type=parse_image_size, nargs="+", default=[(500, 375)])
    args = parser.parse_args(argv)
    check_arguments(parser, args, image_sizes=[("--image-sizes", size) for size in args.image_sizes])
    return args


def measure(args, model, image_processor, device, dtype, size) -> dict:
    images, _ = cap_images(synthetic_images(1, size, args.seed), image_processor)
    inputs = to_device(image_processor(images), device, dtype)
    branch = (inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"], inputs["image_grid_thw"])
    with torch.no_grad():
        embeds = model.get_image_embeds(inputs["pixel_values"], inputs["image_grid_thw"])

    def scoring(multiple):
        def call():
            model.scoring_pad_multiple = multiple
            with torch.no_grad():
                model.score_answers(*branch, embeds)

        return call

    contenders = {f"scoring, pad to {m}": scoring(m) for m in MULTIPLES}
    contenders["floor (vision + LM pass)"] = torch.no_grad()(vlm_floor_call(model.vlm, inputs))
    times = time_interleaved(contenders, args.runs, args.warmup, device)
    model.scoring_pad_multiple = type(model).scoring_pad_multiple
    nodes = len(model._trie.tensors(device)["context_tokens"])
    prompt = inputs["input_ids"].shape[1]
    return {
        "image_size": list(size),
        "prompt_tokens": prompt,
        "trie_tokens_in_pass": nodes,
        "pass_tokens": {str(m): prompt + nodes + (-(prompt + nodes) % m) for m in MULTIPLES},
        "median_s": {name: statistics.median(t[args.clock]) for name, t in times.items()},
        "times": times,
    }


def to_markdown(result: dict) -> str:
    rows = []
    for row in result["results"]:
        medians = row["median_s"]
        off, on = medians["scoring, pad to 1"], medians["scoring, pad to 8"]
        rows.append(
            [
                size_name(row["image_size"]),
                " → ".join(str(row["pass_tokens"][str(m)]) for m in MULTIPLES),
                f"{1000 * off:,.0f}",
                f"{1000 * on:,.0f}",
                f"{on / off:.3f}",
                f"{1000 * medians['floor (vision + LM pass)']:,.0f}",
            ]
        )
    settings = result["settings"]
    return "\n\n".join(
        [
            machine_line(result["machine"]),
            f"Model: {result['model']['description']} ({settings['dtype']}). `score_answers` from precomputed "
            "image embeddings (the LM pass over prompt + trie, the LM head at the read positions), median "
            f"{settings['clock']} time of {settings['runs']} interleaved runs after {settings['warmup']} warm-up.",
            markdown_table(
                ["image", "pass tokens (off → on)", "scoring ms, no padding", "scoring ms, padded", "padded / not"]
                + ["floor ms"],
                rows,
            ),
        ]
    )


def main(argv=None):
    args = parse_args(argv)
    device, dtype, spec, preset, tag = setup(args)
    model, image_processor, _ = build_model(spec, MIKELS_LABELS, device, dtype, args.seed)
    result = {
        "benchmark": "scoring_padding",
        "machine": machine_info(device),
        "model": spec_dict(spec, preset),
        "settings": {
            "dtype": args.dtype,
            "threads": args.threads,
            "clock": args.clock,
            "runs": args.runs,
            "warmup": args.warmup,
        },
        "results": [measure(args, model, image_processor, device, dtype, size) for size in args.image_sizes],
    }
    json_path, md_path, markdown = write_results(result, to_markdown, args.output_dir, f"scoring_padding_{tag}")
    print(markdown)
    print(f"wrote {json_path} and {md_path}")
    return result


if __name__ == "__main__":
    main()
